"""Each rank's SAE codes of every sentence it read, spilled to disk in sentence order, so the top sentences'
activations are re-read, not recomputed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from array import array
from pathlib import Path

import numpy as np


class CodeStore:
    """Each processed sentence's token ids and SAE codes, appended to temporary files on disk.

    Kept so the per-token activations of the finally chosen sentences can be read back without a
    second model pass; memory stays bounded (files, not RAM), and the files go away at the end. Each
    sentence keeps its own code width (k for TopK; for a JumpReLU SAE its busiest token's active count)."""

    def __init__(self, directory: Path, rank: int):
        for stale in Path(directory).glob(f".codes-r{rank}-*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".codes-r{rank}-", dir=directory))
        self.files = {n: open(self.dir / n, "wb") for n in ("tokens", "values", "indices")}
        # per stored sentence: id, first token, token count, first code entry, code width (8 bytes each, not
        # a dict entry: ~100x less memory per sentence, which grows with the corpus)
        self._sids, self._starts, self._lengths = array("q"), array("q"), array("q")
        self._code_starts, self._widths = array("q"), array("q")
        self.n = self.n_codes = 0

    def add(self, sid: int, token_ids: np.ndarray, first_counted: int, values: np.ndarray, indices: np.ndarray) -> None:
        """token_ids [T]; values/indices [T, w] with zeros at positions < first_counted."""
        self.files["tokens"].write(token_ids.astype(np.int32).tobytes())
        self.files["values"].write(values.astype(np.float32).tobytes())
        self.files["indices"].write(indices.astype(np.int32).tobytes())
        self._sids.append(sid)
        self._starts.append(self.n)
        self._lengths.append(len(token_ids))
        self._code_starts.append(self.n_codes)
        self._widths.append(values.shape[1])
        self.n += len(token_ids)
        self.n_codes += values.size

    def open(self) -> None:
        for f in self.files.values():
            f.close()
        # lookups by id at spans(), sorted; by first token at read(), in the (increasing) order written
        order = np.argsort(np.frombuffer(self._sids, np.int64), kind="stable")
        self.ids = np.frombuffer(self._sids, np.int64)[order]
        self.starts = np.frombuffer(self._starts, np.int64)[order]
        self.lengths = np.frombuffer(self._lengths, np.int64)[order]
        self.written_ids = np.frombuffer(self._sids, np.int64)
        self.written_starts = np.frombuffer(self._starts, np.int64)
        self.written_lengths = np.frombuffer(self._lengths, np.int64)
        self.code_starts, self.widths = (
            np.frombuffer(self._code_starts, np.int64),
            np.frombuffer(self._widths, np.int64),
        )
        # read back with pread, not a memory map: mapped pages of a corpus-sized file would stay resident
        self.readers = {n: open(self.dir / n, "rb", buffering=0) for n in ("tokens", "values", "indices")}

    def _read(self, name: str, dtype, first: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype)
        os.preadv(self.readers[name].fileno(), [out], first * out.itemsize)
        return out

    def spans(self, sids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """sids [m] -> (held [m] bool, first token [m], token count [m]) of each stored sentence."""
        if not len(self.ids):  # a rank whose share of the data was empty (fewer row groups than ranks)
            nothing = np.zeros(len(sids), np.int64)
            return nothing.astype(bool), nothing, nothing
        i = np.minimum(np.searchsorted(self.ids, sids), len(self.ids) - 1)
        return self.ids[i] == sids, self.starts[i], self.lengths[i]

    def read(self, first: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored sentence whose tokens start at `first`: token ids [n], values [n, w], indices [n, w]."""
        j = int(np.searchsorted(self.written_starts, first))
        at, width = int(self.code_starts[j]), int(self.widths[j])
        return (
            self._read("tokens", np.int32, first, n),
            self._read("values", np.float32, at, n * width).reshape(n, width),
            self._read("indices", np.int32, at, n * width).reshape(n, width),
        )

    def chunks(self, max_tokens: int = 1 << 18):
        """Every stored sentence once, in written order (sequential reads), in groups of whole sentences of about
        max_tokens tokens: (ids [m], token counts [m], token ids [n], code widths [m], values [c], indices [c]),
        sentence j's codes being its n_j * w_j entries after those of sentences < j."""
        j = 0
        while j < len(self.written_ids):
            end = max(j + 1, int(np.searchsorted(self.written_starts, self.written_starts[j] + max_tokens)))
            end = min(end, len(self.written_ids))
            lengths, widths = self.written_lengths[j:end], self.widths[j:end]
            first, n = int(self.written_starts[j]), int(lengths.sum())
            at, c = int(self.code_starts[j]), int((lengths * widths).sum())
            yield (
                self.written_ids[j:end],
                lengths,
                self._read("tokens", np.int32, first, n),
                widths,
                self._read("values", np.float32, at, c),
                self._read("indices", np.int32, at, c),
            )
            j = end

    def close(self) -> None:
        for f in [*self.files.values(), *getattr(self, "readers", {}).values()]:
            f.close()
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()
