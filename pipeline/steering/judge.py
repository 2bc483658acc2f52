"""The offline steering judge: AxBench's three 0-2 scores and their harmonic mean, without an LLM.

AxBench (Wu et al. 2025) has an LLM rate each steered answer 0, 1 or 2 for concept (does it express the
concept?), instruction (does it still answer the prompt?) and fluency, and reports the harmonic mean (0 when
any score is 0). Offline, each score is a rule on a few numbers read from (concept, instruction, response)
and the clean model, whose thresholds were fitted to hand ratings (tests/data/steering_ratings: GUIDE.md says
how they were made; `python scripts/steering_ratings.py agree` prints this judge's agreement with them):

concept      mentions: the response's words that start with a concept word's stem ("breed" -> "breeds"), plus
             those whose MiniLM embedding is close to a concept word's ("puppy" for "dog"); and the MiniLM
             cosine of the whole response with the concept phrase. 2 for enough mentions or a high cosine.
instruction  the MiniLM cosine of the response with its instruction, capped by that of what the response adds
             to the instruction's own words (without_words): a redefined idiom repeats the words, adds nothing.
fluency      the clean model's mean per-token loss on the response after its instruction (garbled text is
             expensive) and the share of its words inside a word trigram it repeats (loops are cheap, so the loss
             alone passes them).
The thresholds: Thresholds below.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
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
from pipeline.steering.concept import is_content_word


@dataclass(frozen=True)
class Thresholds:
    """The offline judge's thresholds (each pair: score 1 from the first, 2 from the second; for fluency the
    points where it drops to 1 and to 0), fitted on the dev half of the hand ratings
    (`python scripts/steering_ratings.py fit`)."""

    word_similarity: float = 0.75
    """A response word is a mention when its MiniLM cosine with a concept word reaches this."""
    concept_mentions: tuple[int, int] = (1, 2)
    concept_cosine: tuple[float, float] = (0.2, 0.3)
    instruction_cosine: tuple[float, float] = (0.16, 0.28)
    instruction_added_offset: float = 0.15
    """The instruction signal is min(cosine, cosine of what the response adds + this): see without_words."""
    fluency_loss: tuple[float, float] = (1.9, 3.5)
    fluency_loop: tuple[float, float] = (0.45, 0.45)


THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class JudgeItem:
    concept: str
    """The concept phrase ("museum, gallery"; pipeline/steering/concept.py)."""
    instruction: str
    response: str
    loss: float
    """The clean model's mean per-token loss on the response after the instruction (nan: not read)."""


def stem(word: str) -> str:
    """A prefix that also starts the word's other forms ("biology" -> "biolo" for "biological")."""
    return word if len(word) < 6 else word[:-2]


def without_words(response: str, instruction: str) -> str:
    """The response without the instruction's content words (compared by their first 5 letters): what it adds.
    A response that redefines the instruction's phrase ("a walk in the park is a classic urban fantasy film")
    shares its words but adds little about it (its cosine falls; with the fitted offset that one still passes)."""
    asked = {w.lower()[:5] for w in re.findall(r"[A-Za-z]+", instruction) if is_content_word(w)}
    kept = [w for w in re.findall(r"[A-Za-z']+|[.,]", response) if w.lower()[:5] not in asked]
    return " ".join(kept) or "."


def loop_share(text: str) -> float:
    """Share of the text's words inside a word trigram that occurs more than once (a loop's signature)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    counts = Counter(grams)
    inside = set()
    for i, g in enumerate(grams):
        if counts[g] > 1:
            inside.update((i, i + 1, i + 2))
    return len(inside) / len(words) if words else 0.0


class OfflineJudge:
    """AxBench's three scores from MiniLM (any SentenceEncoder) and the clean model's loss (see the docstring)."""

    def __init__(self, encoder, thresholds: Thresholds = THRESHOLDS):
        self.encoder, self.thresholds = encoder, thresholds
        self._vectors: dict[str, torch.Tensor] = {}

    def vectors(self, texts) -> list[torch.Tensor]:
        """[384] unit embeddings, each text embedded once per judge."""
        new = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if new:
            self._vectors.update(zip(new, self.encoder.encode(new)))
        return [self._vectors[t] for t in texts]

    def features(self, items: list[JudgeItem]) -> list[dict]:
        concept_words = [[w for w in re.findall(r"[a-z]+", it.concept.lower()) if is_content_word(w)] for it in items]
        response_words = [[w for w in re.findall(r"[a-z]+", it.response.lower()) if is_content_word(w)] for it in items]
        self.vectors([w for ws in concept_words + response_words for w in ws])
        texts = self.vectors([it.response for it in items])
        concepts = self.vectors([it.concept for it in items])
        instructions = self.vectors([it.instruction for it in items])
        added = self.vectors([without_words(it.response, it.instruction) for it in items])
        out = []
        for it, cw, rw, t, c, i, a in zip(items, concept_words, response_words, texts, concepts, instructions, added):
            stems = [stem(w) for w in cw]
            exact = sum(1 for w in rw if any(w.startswith(s) for s in stems))
            near: list[float] = []  # each other content word's best cosine with a concept word
            if cw:
                cv = torch.stack(self.vectors(cw))  # [n_words, 384]
                near = [float((cv @ self._vectors[w]).max()) for w in rw if not any(w.startswith(s) for s in stems)]
            out.append(
                {
                    "mentions": exact + sum(x >= self.thresholds.word_similarity for x in near),
                    "exact_mentions": exact,
                    "word_similarities": [round(x, 4) for x in near],
                    "similarity": float(t @ c),
                    "instruction_similarity": float(t @ i),
                    "instruction_added_similarity": float(a @ i),
                    "loss": it.loss,
                    "loop": loop_share(it.response),
                    "empty": not it.response.strip(),
                }
            )
        return out

    def score(self, items: list[JudgeItem]) -> list[dict]:
        """Per item: its features and concept, instruction, fluency (0-2), harmonic."""
        return [f | rate(f, self.thresholds) for f in self.features(items)]


def rate(f: dict, t: Thresholds = THRESHOLDS) -> dict:
    """The three scores from one item's features."""

    def level(value: float, thresholds: tuple) -> int:
        return 2 if value >= thresholds[1] else 1 if value >= thresholds[0] else 0

    if f["empty"]:
        return {"concept": 0, "instruction": 0, "fluency": 0, "harmonic": 0.0}
    mentions = f["exact_mentions"] + sum(x >= t.word_similarity for x in f["word_similarities"])
    concept = max(level(mentions, t.concept_mentions), level(f["similarity"], t.concept_cosine))
    asked = min(f["instruction_similarity"], f["instruction_added_similarity"] + t.instruction_added_offset)
    instruction = level(asked, t.instruction_cosine)
    loss = f["loss"] if math.isfinite(f["loss"]) else 0.0
    fluency = 2 - max(level(loss, t.fluency_loss), level(f["loop"], t.fluency_loop))
    return {
        "concept": concept,
        "instruction": instruction,
        "fluency": fluency,
        "harmonic": harmonic_mean(concept, instruction, fluency),
    }


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
