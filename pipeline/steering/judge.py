"""The offline steering judge: AxBench's three 0-2 scores and their harmonic mean, without an LLM.

AxBench (Wu et al. 2025) has an LLM rate each steered answer 0, 1 or 2 for concept (does it express
the concept?), instruction (does it still answer the prompt?) and fluency, and reports the harmonic
mean (0 when any score is 0). Offline, each score is calibrated against text whose answer is known:

concept      cos(MiniLM(continuation), c_l) with c_l the normalised sum of the concept's embedding (the
             meaning's key words, steering_eval.concept_phrase: "film, movie", not "the tokens "film",
             "movie" (often after ...)", whose phrasing every meaning shares) and the centroid of the
             latent's top-activating sentences (the first `n_reference`).
             1 above tau1 = the 95th percentile over the latent's *silent* corpus sentences (concept-
             free text: ~5% of it scores >= 1 by construction), 2 above tau2 = the median over its
             held-out activating sentences (ranks after the reference ones: text that does carry it).
             Unsteered continuations are not used to calibrate, so their rate is a real check.
instruction  where the continuation's own prompt ranks among all evaluation prompts by cos(MiniLM):
             2 first, 1 in the better half, 0 otherwise (an off-topic text ranks at chance).
fluency      the clean model's mean per-token loss on the continuation over that of the unsteered
             continuations of the same prompt, r: 2 for r <= 1.5, 1 for r <= 2.5, else 0; 0 as well when
             more than half the tokens repeat (loops are cheap to predict) or nothing was generated.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_3.errors import PipelineInputError
from pipeline.interpret.batches import (
    BatchState,
    _json_objects,
    adopt_pending,
    custom_id,
    fetch_ended,
    make_client,
    message_text,
    read_results,
    submit,
)

CONCEPT_QUANTILE = 0.95
FLUENCY_RATIOS = (1.5, 2.5)
MAX_REPETITION = 0.5


@dataclass
class ConceptReference:
    vector: torch.Tensor
    """[384] unit concept embedding."""
    tau1: float
    """Score 1 from here: the 95th percentile over silent sentences."""
    tau2: float
    """Score 2 from here: the median over held-out activating sentences (at least tau1)."""


def concept_references(
    encoder, examples, meanings: dict[int, str], latents: list[int], n_reference: int = 8, n_held: int = 8
) -> dict[int, ConceptReference]:
    """One ConceptReference per latent from its meaning, top sentences and silent sentences."""
    plan = {}
    texts: dict[str, None] = {}
    for lat in latents:
        top = [r["sentence_id"] for r in examples.top.get(lat, [])]
        ref, held, silent = top[:n_reference], top[n_reference : n_reference + n_held], examples.silent.get(lat, [])
        plan[lat] = (ref, held, silent)
        texts[meanings[lat]] = None
        for s in ref + held + silent:
            texts[examples.sentences[s]["text"]] = None
    order = list(texts)
    vec = dict(zip(order, encoder.encode(order))) if order else {}
    out = {}
    for lat, (ref, held, silent) in plan.items():
        text = [examples.sentences[s]["text"] for s in ref]
        c = torch.nn.functional.normalize(vec[meanings[lat]], dim=0)
        if text:
            c = c + torch.nn.functional.normalize(torch.stack([vec[t] for t in text]).mean(0), dim=0)
        c = torch.nn.functional.normalize(c, dim=0)
        sil = [float(vec[examples.sentences[s]["text"]] @ c) for s in silent]
        act = [float(vec[examples.sentences[s]["text"]] @ c) for s in held]
        tau1 = float(torch.tensor(sil).quantile(CONCEPT_QUANTILE)) if sil else 1.0
        tau2 = max(float(torch.tensor(act).median()), tau1) if act else math.inf
        out[lat] = ConceptReference(c, tau1, tau2)
    return out


def concept_score(similarity: float, ref: ConceptReference) -> int:
    return 2 if similarity > ref.tau2 else 1 if similarity > ref.tau1 else 0


def instruction_score(similarities: torch.Tensor, own: int) -> int:
    """similarities [P]: the continuation against every evaluation prompt; own: its prompt's index."""
    rank = int((similarities > similarities[own]).sum())  # 0 = best
    return 2 if rank == 0 else 1 if rank < len(similarities) / 2 else 0


def fluency_score(loss: float, unsteered_loss: float, repetition: float) -> int:
    if not math.isfinite(loss) or repetition > MAX_REPETITION:
        return 0
    ratio = loss / max(unsteered_loss, 1e-6)
    return 2 if ratio <= FLUENCY_RATIOS[0] else 1 if ratio <= FLUENCY_RATIOS[1] else 0


def harmonic_mean(*scores: float) -> float:
    """AxBench's aggregate: 0 when any score is 0."""
    if any(s <= 0 for s in scores):
        return 0.0
    return len(scores) / sum(1.0 / s for s in scores)


# ---- with a key: Claude as the judge, AxBench's rubric, through the Message Batches machinery ------

CLAUDE_JUDGE_PROMPT = """You rate a response written by a small language model.

Concept: {concept}
Instruction: {instruction}
Response: {response}

Rate the response on three scales, each 0, 1 or 2:
- concept: 0 the concept is absent; 1 it is somewhat or indirectly present; 2 it is clearly incorporated.
- instruction: 0 the response is unrelated to the instruction; 1 it is somewhat related; 2 it addresses it.
- fluency: 0 not fluent (broken, repetitive or nonsensical); 1 somewhat fluent; 2 fluent.
Answer with one JSON object and nothing else: {{"concept": <0-2>, "instruction": <0-2>, "fluency": <0-2>}}"""

CLAUDE_KEYS = ("concept", "instruction", "fluency")


def claude_judge_params(concept: str, instruction: str, response: str, model: str, max_tokens: int = 64) -> dict:
    prompt = CLAUDE_JUDGE_PROMPT.format(concept=concept, instruction=instruction, response=response)
    return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}


def parse_claude_scores(text: str) -> dict | None:
    """The three integer scores from an answer (the first JSON object holding all of them), else None."""

    for obj in _json_objects(text):
        if isinstance(obj, dict) and all(obj.get(k) in (0, 1, 2) for k in CLAUDE_KEYS):
            scores = {k: int(obj[k]) for k in CLAUDE_KEYS}
            return scores | {"harmonic": harmonic_mean(*scores.values())}
    return None


def run_claude_judge(
    items: list[dict], directory, base_url: str | None, poll_seconds: float, timeout_minutes: float, model: str
) -> dict[int, dict]:
    """items: [{"concept", "instruction", "response"}] -> {item index: scores} for the answers that parse.

    The batch state lives in `directory` (interpretation's BatchState: submit, adopt after a crash, fetch
    what ended), so a killed run resumes its batches; an item whose text changed since it was sent is
    sent again under the next attempt number."""

    directory = Path(directory)
    client = make_client(base_url)
    state = BatchState.load(directory)
    adopt_pending(state, client)
    digests = state.extra.setdefault("digests", {})
    latest = state.latest()
    requests, wanted = [], {}
    for i, item in enumerate(items):
        digest = hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()
        cid, entry = latest.get(i, (None, None))
        if cid is None or digests.get(cid) != digest or entry["status"] in ("errored", "expired", "canceled"):
            cid = custom_id("steer", i, 0 if entry is None else entry["attempt"] + 1)
            digests[cid] = digest
            params = claude_judge_params(item["concept"], item["instruction"], item["response"], model)
            requests.append({"custom_id": cid, "params": params})
        wanted[cid] = i
    if requests:
        submit(state, client, requests)
    t0 = time.monotonic()
    while fetch_ended(state, client, directory):
        if timeout_minutes and time.monotonic() - t0 > 60 * timeout_minutes:
            raise PipelineInputError(
                f"--judge claude: batches in {directory} still processing after {timeout_minutes} min; re-run to "
                "collect them (nothing is sent twice)"
            )
        print(f"steering judge: batches still processing; next poll in {poll_seconds:.0f} s", flush=True)
        time.sleep(poll_seconds)
    out = {}
    for cid, line in read_results(directory).items():
        if cid in wanted and line["result"]["type"] == "succeeded":
            scores = parse_claude_scores(message_text(line))
            if scores is not None:
                out[wanted[cid]] = scores
    return out
