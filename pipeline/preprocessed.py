"""Preprocessed training data: its on-disk format and the exact, mergeable statistics.

    <dir>/manifest.json          kind "preprocessed": capture fingerprint, hook point, policy, split, counts
    <dir>/stats.json             float64 per-dimension mean / variance, mean squared norm, count
    <dir>/train_acts.npy         [n_train, d_model] shuffled (seeded) training activations; batch i is
                                 rows [i * batch_size, (i + 1) * batch_size); the last batch may be short
    <dir>/train_index.npy        [n_train, 2] int64 (sentence_id, position) of each row
    <dir>/val_acts.npy, val_index.npy   the held-out sentences' tokens, in capture order
    <dir>/val_sentence_ids.npy   the held-out sentence ids (sorted)

Activations keep the capture's storage dtype; bf16 is stored as raw uint16 (numpy has no bf16) and
`activations(...)` views it back. All .npy files memory-map.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama_3.errors import PipelineInputError
from pipeline.manifest import read_manifest

KIND = "preprocessed"
TORCH_TO_NP = {"torch.bfloat16": np.uint16, "torch.float16": np.float16, "torch.float32": np.float32}


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (per dimension, float64), plus the summed squared norm."""

    n: int
    mean: np.ndarray
    m2: np.ndarray
    sq_norm_sum: float

    @staticmethod
    def empty(d: int) -> "Moments":
        return Moments(0, np.zeros(d), np.zeros(d), 0.0)

    @staticmethod
    def of(x: np.ndarray | torch.Tensor, chunk_rows: int = 1024) -> "Moments":
        """Moments of rows [n, d] in float64: two passes within cache-sized chunks, merged with Chan's formula."""
        x = torch.as_tensor(x)
        m = Moments.empty(x.shape[1])
        for a in range(0, len(x), chunk_rows):
            c = x[a : a + chunk_rows].double()
            mean = c.mean(0)
            m = m.merge(Moments(len(c), mean.numpy(), ((c - mean) ** 2).sum(0).numpy(), float((c * c).sum())))
        return m

    def merge(self, other: "Moments") -> "Moments":
        """Chan et al.'s parallel update: exact combination of two partial Welford states."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return Moments(n, mean, m2, self.sq_norm_sum + other.sq_norm_sum)

    @property
    def var(self) -> np.ndarray:
        """Population variance (ddof=0)."""
        return self.m2 / max(self.n, 1)


def open_preprocessed(directory: str | Path) -> tuple[dict, dict]:
    """The manifest and the stats of a finished preprocessing run."""
    import json

    directory = Path(directory)
    manifest = read_manifest(directory, KIND)
    stats = json.loads((directory / "stats.json").read_text())
    return manifest, stats


def activations(directory: str | Path, split: str) -> torch.Tensor:
    """Memory-mapped [n, d_model] activations of 'train' or 'val' as a torch tensor (no copy)."""
    directory = Path(directory)
    manifest = read_manifest(directory, KIND)
    path = directory / f"{split}_acts.npy"
    if not path.is_file():
        raise PipelineInputError(f"{path}: missing")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:  # a truncated .npy: its header promises more bytes than there are
        raise PipelineInputError(
            f"{path}: not a readable activation array ({e}); the file is truncated or corrupted: "
            "run sae_preprocessing.py --force"
        ) from None
    expected = manifest.get("counts", {}).get(f"{split}_tokens")
    if expected is not None and arr.shape[0] != expected:
        raise PipelineInputError(
            f"{path}: holds {arr.shape[0]} rows, the manifest says {expected}; run sae_preprocessing.py --force"
        )
    with warnings.catch_warnings():  # a read-only mmap is the point: nothing writes through it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if manifest["storage_dtype"] == "torch.bfloat16" else t
