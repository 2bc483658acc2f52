"""Preprocessed training data: its on-disk format and the exact, mergeable statistics.

    <dir>/manifest.json          kind "preprocessed": capture fingerprint, hook point, policy, split, counts
    <dir>/stats.json             float64 per-dimension mean / variance, mean squared norm, count
    <dir>/train_acts.npy         [n_train, d_model] shuffled (seeded) training activations; batch i is
                                 rows [i * batch_size, (i + 1) * batch_size); the last batch may be short
    <dir>/train_index.npy        [n_train, 2] int64 (sentence_id, position) of each row
    <dir>/val_acts.npy, val_index.npy   the held-out sentences' tokens, in capture order
    <dir>/val_sentence_ids.npy   the held-out sentence ids (sorted)

Activations keep the capture's storage dtype; bf16 is stored as raw uint16 (numpy has no bf16) and
`PreprocessedOutput.activations(...)` views it back. All .npy files memory-map.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import Fields, read_manifest
from pipeline.core.tokenization import Tokenization

KIND = "preprocessed"
TRAIN_ACTS, TRAIN_INDEX = "train_acts.npy", "train_index.npy"
VAL_ACTS, VAL_INDEX = "val_acts.npy", "val_index.npy"
VAL_SENTENCE_IDS = "val_sentence_ids.npy"
STATS = "stats.json"
OUTPUT_FILES = (TRAIN_ACTS, TRAIN_INDEX, VAL_ACTS, VAL_INDEX, VAL_SENTENCE_IDS, STATS)
ACTS = {"train": TRAIN_ACTS, "val": VAL_ACTS}
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


@dataclass(frozen=True)
class PreprocessedOutput:
    """A finished preprocessing folder, opened: the one reader of its manifest for every later stage."""

    directory: Path
    manifest: dict
    stats: dict
    """stats.json: float64 "mean", "var" per dimension, "mean_sq_norm", "count" of the training split."""
    fingerprint: str
    hook_point: str
    d_model: int
    storage_dtype: str
    model: dict
    """The identity of the captured model."""
    tokenization: Tokenization
    """The capture's BOS and truncation, with the sink positions this preprocessing excluded."""
    capture_dir: Path | None
    """The capture it was made from (None: made from data without one, e.g. a benchmark's)."""

    @staticmethod
    def open(directory: str | Path) -> "PreprocessedOutput":
        directory = Path(directory)
        m = Fields(directory, read_manifest(directory, KIND))
        path = directory / STATS
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PipelineInputError(
                f"{path}: missing or not valid JSON ({e}); run sae_preprocessing.py --force"
            ) from None
        capture = m.get("inputs.capture", (str, type(None)), default=None)
        return PreprocessedOutput(
            directory=directory,
            manifest=m.manifest,
            stats=stats,
            fingerprint=m.get("fingerprint", str),
            hook_point=m.get("hook_point", str),
            d_model=m.get("d_model", int),
            storage_dtype=m.get("storage_dtype", str),
            model=m.get("inputs.model", dict),
            tokenization=Tokenization(
                m.get("tokenization.add_bos", bool),
                m.get("tokenization.max_tokens", int),
                m.get("tokenization.exclude_first_positions", int),
                float(m.get("tokenization.sink_norm", float, default=0.0)),
            ),
            capture_dir=Path(capture) if capture else None,
        )

    def _array(self, split: str) -> np.memmap:
        """The split's activation file, memory-mapped and checked against the manifest's row count."""
        path = self.directory / ACTS[split]
        if not path.is_file():
            raise PipelineInputError(f"{path}: missing")
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:  # a truncated .npy: its header promises more bytes than there are
            raise PipelineInputError(
                f"{path}: not a readable activation array ({e}); the file is truncated or corrupted: "
                "run sae_preprocessing.py --force"
            ) from None
        expected = Fields(self.directory, self.manifest).get(f"counts.{split}_tokens", int)
        if arr.shape[0] != expected:
            raise PipelineInputError(
                f"{path}: holds {arr.shape[0]} rows, the manifest says {expected}; run sae_preprocessing.py --force"
            )
        return arr

    @property
    def _torch_dtype(self) -> torch.dtype:
        return {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}.get(self.storage_dtype, torch.float32)

    def activations(self, split: str) -> torch.Tensor:
        """Memory-mapped [n, d_model] activations of 'train' or 'val' as a torch tensor (no copy)."""
        arr = self._array(split)
        with warnings.catch_warnings():  # a read-only mmap is the point: nothing writes through it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.storage_dtype == "torch.bfloat16" else t

    def reader(self, split: str) -> "RowReader":
        """The split's rows for reading in pieces, with bounded memory (see RowReader)."""
        arr = self._array(split)
        return RowReader(self.directory / ACTS[split], arr.offset, arr.shape, self._torch_dtype)

    def index(self, split: str) -> np.ndarray:
        """[n, 2] int64 (sentence_id, position) of each row of 'train' or 'val', memory-mapped."""
        path = self.directory / (TRAIN_INDEX if split == "train" else VAL_INDEX)
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise PipelineInputError(f"{path}: missing or unreadable ({e}); run sae_preprocessing.py --force") from None

    def val_sentence_ids(self) -> np.ndarray:
        return np.load(self.directory / VAL_SENTENCE_IDS)


class RowReader:
    """Rows [a, b) of an activation file read with plain file reads into fresh buffers.

    Not a memory map: pages read through a map stay in the process's resident set, so its RSS would
    grow with the data (8 GB at 16M tokens of d_model 256) though only one batch is in use."""

    def __init__(self, path: Path, header: int, shape: tuple[int, int], dtype: torch.dtype):
        self.path, self.header, self.shape, self.dtype = Path(path), header, tuple(shape), dtype
        self.row_bytes = shape[1] * torch.empty((), dtype=dtype).element_size()
        self._file = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(len(self))
        assert step == 1, "contiguous rows only"
        n = max(0, stop - start)
        out = torch.empty((n, self.shape[1]), dtype=self.dtype)
        if n:
            if self._file is None:  # one handle per reader (and per process: readers pickle without it)
                self._file = open(self.path, "rb", buffering=0)
            got = os.preadv(self._file.fileno(), [out.view(torch.uint8).numpy()], self.header + start * self.row_bytes)
            if got != n * self.row_bytes:
                raise PipelineInputError(f"{self.path}: rows {start}..{stop} cut short (truncated file?)")
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}
