"""Per-latent top sentences: running top-N tables, per-latent statistics, and the output contract.

Every latent keeps its own top N sentences under each aggregation of its activation over the
sentence's tokens (mean, max, last token) — the original credited a sentence only to its single
strongest latent. Tables live on the device as [L, N] score / sentence-id tensors and merge with
one sort per batch, never a Python heap per latent. Ties rank the lower sentence id first, so the
result does not depend on batch order or on how sentences were split across ranks.

Output folder (written by capture_top_activating_sentences.py, read by the browser, interpretation
and steering stages through `open_top_sentences`):
    top_sentences.parquet   latent, aggregation, rank, sentence_id, score, token_activations (list<float>); besides
                            the top N per aggregation, rows of aggregation "sample": a fixed random sample of the
                            sentences where the latent fires (every activation level, delphi's quantile examples),
                            ranked by their peak activation (the score)
    non_activating.parquet  latent, sentence_id, kind, token: deterministic samples where the latent never fires,
                            kind "random" (any such sentence) or "shares_token" (hard negatives: sentences holding
                            the latent's key token, the one at the peak of most of its top sentences, named in token)
    latent_stats.parquet    latent, firing_tokens, frequency, mean_activation, histogram (list<int>),
                            promoted / suppressed (list<string>: output tokens, unembedding · decoder row),
                            promoted_logits / suppressed_logits (list<float>: those effects), logit_lens_z (how far
                            the strongest stands out; the manifest's logit_lens_random_z: a random direction's)
    sentences.parquet       sentence_id, text, tokens (list<string>) for every sentence referenced
    manifest.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import Fields, read_manifest, sha256_file

KIND = "top_sentences"
Aggregation = Literal["mean", "max", "last"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
SAMPLE = "sample"
ROW_KINDS = (*AGGREGATIONS, SAMPLE)  # the aggregation column's values
SILENT_KINDS = ("random", "shares_token")  # the non-activating table's kind column
# log10(activation) histogram: HIST_BINS bins over [HIST_LOG10_MIN, HIST_LOG10_MAX], ends clamped.
HIST_BINS, HIST_LOG10_MIN, HIST_LOG10_MAX = 40, -3.0, 3.0
FILES = ("top_sentences.parquet", "non_activating.parquet", "latent_stats.parquet", "sentences.parquet")


class TopTable:
    """For each of L rows, the N best (score, sentence id) pairs seen so far; -inf marks an empty slot."""

    def __init__(self, n_rows: int, n: int, device: torch.device | str = "cpu"):
        self.scores = torch.full((n_rows, n), -torch.inf, device=device)
        self.ids = torch.full((n_rows, n), -1, dtype=torch.long, device=device)

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    def update(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """scores [L, B] for sentences ids [B] (or [L, B]); -inf entries never enter."""
        if ids.dim() == 1:
            ids = ids[None, :].expand_as(scores)
        self.scores, self.ids = merge_top(
            torch.cat([self.scores, scores.float()], 1), torch.cat([self.ids, ids], 1), self.n
        )


def merge_top(scores: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best n per row by score, ties by lower id: two stable sorts (id ascending, then score descending)."""
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, :n]
    return scores.gather(1, by_score), ids.gather(1, by_score)


def joined_codes(parts, active_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SaeOutputs of consecutive token batches -> one code (values [n, w], indices [n, w]) of the widest
    part's width: TopK parts all have width k; a JumpReLU part narrower than the widest is padded with
    value-0 entries (latent 0), which every aggregation here counts as nothing. active_first: each row's
    entries sorted by value, so its active latents come first and a sentence's code can drop the columns
    that are zero on all its tokens (JumpReLU: the batch's width is its busiest token's count)."""
    width = max(p.values.shape[1] for p in parts)
    pad = [width - p.values.shape[1] for p in parts]
    values = torch.cat([F.pad(p.values, (0, n)) for p, n in zip(parts, pad)])
    indices = torch.cat([F.pad(p.indices, (0, n)) for p, n in zip(parts, pad)])
    if active_first:
        values, order = values.sort(dim=1, descending=True)
        indices = indices.gather(1, order)
    return values, indices


def sentence_scores(
    values: torch.Tensor,
    indices: torch.Tensor,
    row: torch.Tensor,
    is_last: torch.Tensor,
    n_sentences: int,
    n_latents: int,
) -> dict[str, torch.Tensor]:
    """Aggregate token codes into per-sentence latent scores.

    values, indices [n, k]: the SAE's active latents for n tokens; row [n]: the sentence (0..B-1) of
    each token; is_last [n]: the sentence's last counted token. Returns {aggregation: [B, L]}.
    """
    k = values.shape[1]
    flat = (row[:, None] * n_latents + indices).reshape(-1)  # [n*k] positions in a [B, L] matrix
    v = values.reshape(-1).float()
    total = torch.zeros(n_sentences * n_latents, device=values.device).index_add_(0, flat, v)
    peak = torch.zeros(n_sentences * n_latents, device=values.device).scatter_reduce_(0, flat, v, "amax")
    last_mask = is_last[:, None].expand(-1, k).reshape(-1)
    # amax, not assignment: a padded code (joined_codes) can repeat a latent id in a row with value 0
    last = torch.zeros(n_sentences * n_latents, device=values.device)
    last.scatter_reduce_(0, flat[last_mask], v[last_mask], "amax")
    n_tokens = torch.bincount(row, minlength=n_sentences).clamp_min(1).float()
    return {
        "mean": total.view(n_sentences, n_latents) / n_tokens[:, None],
        "max": peak.view(n_sentences, n_latents),
        "last": last.view(n_sentences, n_latents),
    }


def sample_key(sentence_ids: torch.Tensor, n_latents: int, salt: int = 0) -> torch.Tensor:
    """A pseudo-random but fixed key per (latent, sentence), [L, B], exact in float32 (< 2^24).

    A sample keeps the sentences with the largest keys among those eligible (where the latent never fires; where
    it fires): a deterministic reservoir that merges across ranks like any top-N table. salt: another sample."""
    lat = torch.arange(n_latents, device=sentence_ids.device, dtype=torch.long)[:, None]
    return pair_key(sentence_ids[None, :], lat, salt).float()


def pair_key(sentence_ids, latents, salt: int = 0):
    """sample_key's hash for any broadcastable (sentence, latent) integer arrays or tensors, in [0, 2^24)."""
    h = (sentence_ids * 2654435761 + latents * 40503 + 12345 + salt * 7919) % 2147483647
    h = (h * 48271) % 2147483647
    return h % (1 << 24)


class SparseSample:
    """Per latent, the n (key, sentence id) pairs with the largest keys among candidates offered as flat arrays
    (a TopTable for candidates too sparse for an [L, B] matrix: the hard negatives). Ties: lower id first."""

    def __init__(self, n: int):
        self.n = n
        self.latent = self.key = self.sentence_id = np.zeros(0, np.int64)

    def update(self, latent: np.ndarray, sentence_id: np.ndarray, key: np.ndarray) -> None:
        lat = np.concatenate([self.latent, latent])
        sid = np.concatenate([self.sentence_id, sentence_id])
        key = np.concatenate([self.key, key])
        order = np.lexsort((sid, -key, lat))
        lat, sid, key = lat[order], sid[order], key[order]
        first = np.flatnonzero(np.r_[True, lat[1:] != lat[:-1]]) if len(lat) else np.zeros(0, np.int64)
        rank = np.arange(len(lat)) - np.repeat(first, np.diff(np.r_[first, len(lat)]))
        keep = rank < self.n
        self.latent, self.sentence_id, self.key = lat[keep], sid[keep], key[keep]


class LatentStats:
    """Token counts, activation sums and log-spaced activation histograms per latent."""

    def __init__(self, n_latents: int, device: torch.device | str = "cpu"):
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.firing = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.total = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.hist = torch.zeros(n_latents * HIST_BINS, dtype=torch.long, device=device)
        self.n_latents = n_latents

    def add(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        active = values > 0
        idx, v = indices[active], values[active].float()
        self.tokens += values.shape[0]
        self.firing.index_add_(0, idx, torch.ones_like(idx))
        self.total.index_add_(0, idx, v.double())
        b = (
            ((v.log10() - HIST_LOG10_MIN) / (HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_BINS)
            .long()
            .clamp_(0, HIST_BINS - 1)
        )
        self.hist.index_add_(0, idx * HIST_BINS + b, torch.ones_like(idx))

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens.view(1), self.firing, self.total, self.hist]


def histogram_edges() -> list[float]:
    step = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
    return [10 ** (HIST_LOG10_MIN + i * step) for i in range(HIST_BINS + 1)]


@dataclass(frozen=True)
class TopSentences:
    """An opened output folder: its manifest's fields and its tables (pyarrow); the one reader later stages use."""

    directory: Path
    manifest: dict
    fingerprint: str
    sae_dir: Path
    sae_sha256: str
    """The SAE the tables belong to: interpretation state and meanings are bound to it."""
    source_capture: Path | None
    """The capture the stage read the first `capture_sentences` sentences' activations from (checked against
    the SAE); None when the model ran on every sentence."""
    capture_sentences: int

    @staticmethod
    def of(directory: str | Path, manifest: dict) -> "TopSentences":
        """Typed fields of a manifest (written or about to be): one error line for a missing one."""
        m = Fields(Path(directory), manifest)
        return TopSentences(
            directory=Path(directory),
            manifest=manifest,
            fingerprint=m.get("fingerprint", str),
            sae_dir=Path(m.get("inputs.sae", str)),
            sae_sha256=m.get("inputs.sae_sha256", str),
            source_capture=Path(capture) if (capture := m.get("source.capture", (str, type(None)), None)) else None,
            capture_sentences=m.get("source.capture_sentences", int, 0),
        )

    def field(self, dotted: str, kind: type | tuple[type, ...] = object):
        """Any other manifest field, by dotted path (the browser's counts, config ...)."""
        return Fields(self.directory, self.manifest).get(dotted, kind)

    def table(self, name: str, columns: list[str] | None = None):
        path = self.directory / f"{name}.parquet"
        try:
            return pq.read_table(path, columns=columns)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise PipelineInputError(
                f"{path}: cannot be read ({str(e).splitlines()[0]}); the file is truncated or corrupted: "
                "run capture_top_activating_sentences.py --force"
            ) from None


def open_top_sentences(directory: str | Path) -> TopSentences:
    """Validate a finished top-sentences folder (every file present and matching its sha256) and read it."""
    directory = Path(directory)
    manifest = read_manifest(directory, KIND)
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise PipelineInputError(
            f"{directory}: incomplete top-sentences output, missing {', '.join(missing)}; run the stage again"
        )
    for name, digest in manifest.get("files", {}).items():
        if sha256_file(directory / name) != digest:
            raise PipelineInputError(
                f"{directory / name}: checksum differs from its manifest (truncated or corrupted); "
                "run capture_top_activating_sentences.py --force"
            )
    return TopSentences.of(directory, manifest)
