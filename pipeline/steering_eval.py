"""Does steering a latent make the model write what the latent means?

For each latent and mode, the same prompts are continued unsteered and steered (greedy by
default), then every continuation is re-encoded: the clean model reads prompt + continuation and
the SAE encodes its activations at the hook point, so the measured activation is what the *text*
evokes, not the intervention itself. Reported per (latent, mode):

    activation      mean activation of the latent over continuation tokens (unsteered -> steered)
    in_stream       the same in the stream the model saw (the intervention itself: it should be high)
    firing          fraction of continuation tokens where the latent is active
    keyword_rate    fraction of continuations containing one of the meaning's key words
    repetition      1 - distinct tokens / tokens of a continuation (fluency breaks as strength grows)

Strengths are `strength_factor` x the latent's largest activation on the corpus (its top
sentence by max), so one factor means the same thing for every latent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipeline.steering import SteeringEntry, hook_activations, steering_batch
from pipeline.top_sentences import open_top_sentences

DEFAULT_PROMPTS = (
    "My favourite thing is",
    "Yesterday, we went to",
    "The story begins with",
    "Here is a short description:",
    "The most important part of",
    "She looked at the",
)


def latent_scales(top_sentences_dir: str) -> dict[int, float]:
    """{latent: its largest per-token activation on the corpus} from the top-sentences output."""
    table = open_top_sentences(top_sentences_dir).table("top_sentences", ["latent", "aggregation", "rank", "score"])
    rows = table.to_pydict()
    return {
        lat: float(s)
        for lat, agg, rank, s in zip(rows["latent"], rows["aggregation"], rows["rank"], rows["score"])
        if agg == "max" and rank == 0
    }


def dense_codes(sae, x: torch.Tensor) -> torch.Tensor:
    """x [T, d] -> the SAE's codes as a dense [T, n_latents]."""
    out = sae(x.float())
    return torch.zeros(len(x), sae.cfg.n_latents, device=x.device).scatter_(1, out.indices, out.values)


@torch.inference_mode()
def continuation_activations(
    model, sae, splice, prompt: list[int], continuation: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean model reads prompt + continuation. Returns, for the continuation's tokens, the SAE
    codes [T_cont, n_latents] of (the text's own activations, the stream after the splice): the
    clean capture is what the splice saw during generation, the splice of it what the model saw."""
    x = hook_activations(model, sae.cfg.hook_point, prompt + continuation)  # [T, d]
    positions = torch.arange(len(x), device=x.device)[None]
    stream = splice(x[None], positions)[0]
    start = len(prompt)
    return dense_codes(sae, x[start:]), dense_codes(sae, stream[start:])


def repetition(tokens: list[int]) -> float:
    return 1.0 - len(set(tokens)) / len(tokens) if tokens else 0.0


KEYWORD_STOPWORDS = frozenset(
    """a an the and or of to in on at for with by from as is are was were be been it its this that these
those token tokens often after before word words text about into over under than then such like mostly mainly""".split()
)


def meaning_keywords(meaning: str) -> list[str]:
    """Key words of a meaning: its quoted strings if it has any (the offline explainer quotes tokens),
    else its content words (>= 3 letters, not stop words); lowercased, unique, in order."""
    quoted = re.findall(r'"([^"]+)"|“([^”]+)”', meaning)
    words = [a or b for a, b in quoted] or re.findall(r"[A-Za-z][A-Za-z'-]{2,}", meaning)
    out: list[str] = []
    for w in words:
        w = w.strip().lower()
        if w and w not in KEYWORD_STOPWORDS and w not in out and any(c.isalnum() for c in w):
            out.append(w)
    return out


def keyword_hit(text: str, keywords: list[str]) -> bool:
    """A key word (>= 3 characters) starting a word of the text, case-insensitive ("bone" hits "bones")."""
    low = text.lower()
    return any(re.search(r"(?<![a-z0-9])" + re.escape(k), low) for k in keywords if len(k) >= 3)


@dataclass
class Continuations:
    tokens: list[list[int]]
    texts: list[str]
    codes: list[torch.Tensor]
    """Per continuation, dense SAE codes [T, n_latents] of the re-encoded text."""
    stream_codes: list[torch.Tensor]
    """The same for the stream the model saw (the text's activations with the steering applied)."""


def generate_and_encode(
    session, prompts: list[list[int]], entries: list[SteeringEntry], sampling: dict, keep_error: bool
) -> Continuations:
    sae = session.steerable.sae
    batch, splice = steering_batch(sae, prompts, entries, keep_error, compare=False)
    out = session.gen.generate(batch, splice={session.steerable.hook_point: splice}, **sampling)
    pairs = [continuation_activations(session.loaded.model, sae, splice, p, c.tokens) for p, c in zip(prompts, out)]
    return Continuations([c.tokens for c in out], [c.text for c in out], [a for a, _ in pairs], [b for _, b in pairs])


def summarize(latent: int, cont: Continuations, keywords: list[str]) -> dict:
    per_token = torch.cat([c[:, latent] for c in cont.codes])
    in_stream = torch.cat([c[:, latent] for c in cont.stream_codes])
    n = max(len(per_token), 1)
    return {
        "activation": round(float(per_token.sum()) / n, 4),
        "in_stream": round(float(in_stream.sum()) / n, 4),
        "firing": round(float((per_token > 0).sum()) / n, 4),
        "keyword_rate": round(sum(keyword_hit(t, keywords) for t in cont.texts) / max(len(cont.texts), 1), 4),
        "repetition": round(sum(repetition(t) for t in cont.tokens) / max(len(cont.tokens), 1), 4),
    }
