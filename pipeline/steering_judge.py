"""The offline steering judge: AxBench's three 0-2 scores and their harmonic mean, without an LLM.

AxBench (Wu et al. 2025) has an LLM rate each steered answer 0, 1 or 2 for concept (does it express
the concept?), instruction (does it still answer the prompt?) and fluency, and reports the harmonic
mean (0 when any score is 0). Offline, each score is calibrated against text whose answer is known:

concept      cos(MiniLM(continuation), c_l) with c_l the normalised sum of the meaning's embedding
             and the centroid of the latent's top-activating sentences (the first `n_reference`).
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

import math
from dataclasses import dataclass

import torch

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
