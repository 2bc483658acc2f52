"""Where top sentences gets its activations: read back from the SAE's own capture, or the model run again.

The default sentence set of top sentences is the one the SAE's capture already pushed through the
model, and those activations sit on disk: re-running the forward costs as much as the capture did,
reading the shards well under a second per GB. `plan_source` decides per run (--source auto|capture|
model) and says why; both sources hand the tables the same `CountedBatch`es, so everything after the
forward is one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from llama_3.errors import PipelineInputError
from pipeline.capture.activations import CapturedSentences, CaptureOutput
from pipeline.core.tokenization import Tokenization
from pipeline.sentences.dataset import SentenceBatch, SentenceDataset

Source = Literal["auto", "capture", "model"]


@dataclass
class CountedBatch:
    """Sentences as the top-sentence tables take them: the SAE's input at every counted position."""

    sentence_ids: torch.Tensor  # [B] int64
    tokens: list[np.ndarray]  # per sentence, its whole sequence (BOS included when the SAE's capture had it)
    acts: torch.Tensor  # [n, d_model]: counted positions (a suffix of each sentence), sentence by sentence
    n_counted: torch.Tensor  # [B] int64 counted positions per sentence (0: the sentence ranks nowhere)
    from_capture: bool = False


def from_model_batch(batch: SentenceBatch, acts: torch.Tensor, skip_first: int) -> CountedBatch:
    """A padded [B, T] batch and its hook activations [B, T, d] -> the counted rows."""
    T = batch.tokens.shape[1]
    pos = torch.arange(T)[None, :]
    counted = (pos < batch.lengths[:, None]) & (pos >= skip_first)  # [B, T]
    tokens = [batch.tokens[r, :n].numpy() for r, n in enumerate(batch.lengths.tolist())]
    return CountedBatch(batch.sentence_ids, tokens, acts[counted.to(acts.device)], counted.sum(1))


def from_capture(chunk: CapturedSentences, tokenization: Tokenization, bos_id: int | None, end: int) -> CountedBatch:
    """Captured sentences (text tokens only, ids < `end` kept) -> the counted rows of their sequences."""
    keep = [i for i, sid in enumerate(chunk.sentence_ids) if sid < end]
    lengths = np.diff(chunk.starts)
    text_pos = np.arange(chunk.starts[-1]) - np.repeat(chunk.starts[:-1], lengths)  # [n] position in its text
    sentence = np.repeat(np.arange(len(lengths)), lengths)
    rows = (text_pos >= tokenization.exclude_first_positions) & np.isin(sentence, keep)
    bos = [bos_id] if tokenization.add_bos else []
    tokens = [np.asarray(bos + chunk.token_ids[chunk.starts[i] : chunk.starts[i + 1]].tolist()) for i in keep]
    n_counted = np.maximum(lengths[keep] - tokenization.exclude_first_positions, 0)
    return CountedBatch(
        torch.tensor([chunk.sentence_ids[i] for i in keep], dtype=torch.long),
        tokens,
        chunk.acts[torch.from_numpy(rows)],
        torch.from_numpy(n_counted).long(),
        from_capture=True,
    )


@dataclass
class SourcePlan:
    """Sentence ids [0, capture_end) come from `capture`, [capture_end, end) from the model."""

    capture: CaptureOutput | None
    capture_end: int
    end: int
    model_dtype: torch.dtype
    note: str
    """Which source, and why (printed and kept in the manifest)."""

    @property
    def needs_model_forward(self) -> bool:
        return self.capture_end < self.end

    def describe(self) -> dict:
        return {
            "capture": str(self.capture.directory) if self.capture else None,
            "capture_sentences": self.capture_end,
            "model_sentences": self.end - self.capture_end,
            "model_dtype": str(self.model_dtype),
            "note": self.note,
        }


def capture_mismatch(capture: CaptureOutput, sae, sentences: SentenceDataset, model_dtype: torch.dtype | None):
    """Why this capture cannot stand in for the SAE's forward on these sentences (None: it can)."""
    key = sae.model_mismatch(capture.model)
    if key:
        return f"it ran another model ({key} differs from the SAE's)"
    if sae.cfg.hook_point not in capture.hook_points:
        return f"it holds {', '.join(capture.hook_points)}, not the SAE's {sae.cfg.hook_point}"
    captured = Tokenization(capture.tokenization.add_bos, capture.tokenization.max_tokens)
    wanted = Tokenization(sae.cfg.add_bos, sae.cfg.max_tokens)
    if captured != wanted:
        return f"its tokenization ({captured}) is not the SAE's ({wanted})"
    if capture.sentences_fingerprint != sentences.fingerprint:
        return f"it captured another sentence dataset ({capture.sentences_dir})"
    if model_dtype is not None and str(model_dtype) != capture.model_dtype:
        return f"its model ran in {capture.model_dtype}, not the requested {model_dtype}"
    return None


def plan_source(
    source: Source,
    capture_dir: Path | None,
    sae,
    sentences: SentenceDataset,
    max_sentences: int,
    model_dtype: torch.dtype | None,
    default_dtype: torch.dtype,
) -> SourcePlan:
    """Read the capture where it holds the requested sentences as the SAE saw them; run the model for the
    rest. --source capture refuses (one line) what auto would quietly run the model for."""
    end = min(max_sentences, sentences.n_sentences) if max_sentences else sentences.n_sentences
    model_only = SourcePlan(None, 0, end, model_dtype or default_dtype, "")
    if source == "model":
        model_only.note = "--source model: the model runs on every sentence"
        return model_only
    reason, capture = None, None
    if capture_dir is None:
        reason = "the SAE records no capture it was trained from (pass --capture)"
    else:
        try:
            capture = CaptureOutput.open(capture_dir)
            reason = capture_mismatch(capture, sae, sentences, model_dtype)
            if reason is None:
                capture.check_readable(sae.cfg.hook_point)
        except PipelineInputError as e:
            reason = f"it cannot be read ({e})"
        reason = reason and f"capture {capture_dir}: {reason}"
    if reason:
        if source == "capture":
            raise PipelineInputError(f"--source capture: {reason}")
        model_only.note = f"the model runs on every sentence: {reason}"
        return model_only
    capture_end = min(capture.sentence_end(sentences.n_sentences), end)
    if capture_end < end and source == "capture":
        raise PipelineInputError(
            f"--source capture: {capture.directory} holds sentences 0..{capture_end - 1}, not the {end} requested "
            "(--source auto runs the model for the rest)"
        )
    dtype = model_dtype or getattr(torch, capture.model_dtype.removeprefix("torch."))
    note = f"activations of sentences 0..{capture_end - 1} read from {capture.directory}"
    if capture_end < end:
        note += f"; the model runs on {capture_end}..{end - 1}"
    return SourcePlan(capture, capture_end, end, dtype, note)


def capture_batches(
    plan: SourcePlan,
    hook_point: str,
    tokenization: Tokenization,
    bos_id: int | None,
    rank: int,
    world_size: int,
    max_rows: int,
) -> Iterator[CountedBatch]:
    """This rank's share of the capture (every world_size-th shard), as counted batches."""
    for chunk in plan.capture.read_sentences(hook_point, rank, world_size, max_rows):
        batch = from_capture(chunk, tokenization, bos_id, plan.capture_end)
        if len(batch.sentence_ids):
            yield batch
