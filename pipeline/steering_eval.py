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

from pipeline.steering import SteeringEntry, sae_splice
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
    return encode_continuations(model, sae, splice, [prompt], [continuation])[0]


@torch.inference_mode()
def encode_continuations(
    model, sae, splice, prompts: list[list[int]], continuations: list[list[int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """continuation_activations for a batch of rows in one forward: right-padded, so every real token
    sees only its own row's earlier tokens (causal attention); `splice` steers row b as the generation
    of row b was steered."""
    seqs = [p + c for p, c in zip(prompts, continuations)]
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long, device=device)
    for b, seq in enumerate(seqs):
        tokens[b, : len(seq)] = torch.tensor(seq, device=device)
    x = model.capture(tokens, [sae.cfg.hook_point])[sae.cfg.hook_point].float()  # [R, T, d]
    positions = torch.arange(tokens.shape[1], device=device)[None].expand(len(seqs), -1)
    stream = splice(x, positions)
    out = []
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        span = slice(len(p), len(p) + len(c))
        out.append((dense_codes(sae, x[b, span]), dense_codes(sae, stream[b, span])))
    return out


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
    session, prompts: list[list[int]], row_entries: list[list[SteeringEntry]], sampling: dict, keep_error: bool
) -> Continuations:
    """One batch: row b continues prompts[b] steered by row_entries[b] (empty: unsteered), then the
    clean model re-reads every continuation."""
    sae = session.steerable.sae
    splice = sae_splice(sae, keep_error=keep_error, row_entries=row_entries)
    out = session.gen.generate(prompts, splice={session.steerable.hook_point: splice}, **sampling)
    pairs = encode_continuations(session.loaded.model, sae, splice, prompts, [c.tokens for c in out])
    return Continuations([c.tokens for c in out], [c.text for c in out], [a for a, _ in pairs], [b for _, b in pairs])


def generate_rows(
    session,
    rows: list[tuple[list[int], list[SteeringEntry]]],
    sampling: dict,
    keep_error: bool,
    batch_rows: int,
    progress=None,
) -> Continuations:
    """Every (prompt, entries) row, in batches of at most `batch_rows`: a row's greedy continuation
    does not depend on its batch mates (left padding, own RoPE positions, own steering entries)."""
    done = Continuations([], [], [], [])
    for a in range(0, len(rows), batch_rows):
        part = rows[a : a + batch_rows]
        got = generate_and_encode(session, [p for p, _ in part], [e for _, e in part], sampling, keep_error)
        for field in ("tokens", "texts", "codes", "stream_codes"):
            getattr(done, field).extend(getattr(got, field))
        if progress is not None:
            progress.update(len(part))
    return done


def select(cont: Continuations, picked: range) -> Continuations:
    return Continuations(*([getattr(cont, f)[i] for i in picked] for f in ("tokens", "texts", "codes", "stream_codes")))


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
