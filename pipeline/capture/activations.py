"""Activation shards: the capture stage's on-disk format, its background writer and its reader.

A capture folder holds `manifest.json` (kind "activations") and, per rank, shards
`acts-r{rank}-{index}.safetensors` of exactly `shard_tokens` real tokens (a rank's last shard
may hold fewer). Padding and BOS positions are never stored. Tensors in a shard:

    act.<hook point>          [n_tokens, d_model]  storage dtype (bf16 by default)
    token_ids                 [n_tokens]           int32
    sentence_ids              [n_sentences]        int64, the sentence dataset's global ids
    sentence_starts           [n_sentences + 1]    int64, rows of sentence i are [starts[i], starts[i+1])
    sentence_first_position   [n_sentences]        int32, position in its sentence of its first row here
                                                   (nonzero when a sentence continues from the previous shard)

so every row traces back to (sentence id, position). safetensors files memory-map: readers pull
slices without loading a shard whole. A shard is written to a temp name, fsynced and renamed, so
a visible shard is complete; the per-rank progress file lists the shards a resume may keep.
"""

from __future__ import annotations

import errno
import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import Fields, atomic_path, read_manifest, sha256_file
from pipeline.core.runtime import set_thread_device
from pipeline.core.tokenization import Tokenization

KIND = "activations"
SHARD_PREFIX = "acts-r"
PROGRESS_PREFIX = "_progress-r"
"""A rank's progress file while it captures (which shards it finished); removed when the capture is done."""


def shard_filename(rank: int, index: int) -> str:
    return f"{SHARD_PREFIX}{rank:03d}-{index:05d}.safetensors"


def rank_shard_glob(rank: int) -> str:
    """Every file of one rank's shards, finished or temporary (`.<name>.<random>.tmp`)."""
    return f"*{SHARD_PREFIX}{rank:03d}-*"


def progress_filename(rank: int) -> str:
    return f"{PROGRESS_PREFIX}{rank:03d}.json"


def act_key(hook_point: str) -> str:
    return f"act.{hook_point}"


@dataclass
class TokenChunk:
    """Real tokens of consecutive sentences, packed row-major: what one forward hands the writer."""

    acts: dict[str, torch.Tensor]  # hook point -> [n, d_model], possibly still on the GPU
    token_ids: torch.Tensor  # [n]
    sentence_ids: list[int]
    first_positions: list[int]  # position within its sentence of each sentence's first row here
    lengths: list[int]  # rows per sentence here
    ready: torch.cuda.Event | None = None  # set when an async device->host copy has finished


@dataclass
class _Buffer:
    acts: dict[str, np.ndarray]
    token_ids: np.ndarray
    n: int = 0
    sentence_ids: list[int] = field(default_factory=list)
    first_positions: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=lambda: [0])


class ShardWriter:
    """Fills fixed-size shards on a background thread (a bounded queue), so disk writes overlap forwards.

    `on_shard(info)` runs on the writer thread after each shard is renamed into place, with
    {"file", "n_tokens", "n_sentences", "sha256", "bytes"}; the capture records it as progress.
    Errors on the thread (disk full, ...) re-raise in the caller at the next put() or close().
    """

    def __init__(
        self,
        out: Path,
        rank: int,
        hook_points: list[str],
        d_model: int,
        dtype: torch.dtype,
        shard_tokens: int,
        first_index: int,
        on_shard: Callable[[dict], None],
        max_queue: int = 4,
        device: torch.device | None = None,
    ):
        self.out, self.rank, self.hooks = Path(out), rank, list(hook_points)
        self.d_model, self.dtype, self.shard_tokens = d_model, dtype, shard_tokens
        self.index = first_index
        self.on_shard = on_shard
        self.device = device  # the rank's GPU, whose events the thread waits on
        # numpy has no bf16: buffers hold the raw 16-bit patterns and are viewed back on save.
        self._np_dtype = np.uint16 if dtype in (torch.bfloat16, torch.float16) else np.float32
        self.buf = self._new_buffer()
        self.q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _new_buffer(self) -> _Buffer:
        return _Buffer(
            {h: np.empty((self.shard_tokens, self.d_model), self._np_dtype) for h in self.hooks},
            np.empty(self.shard_tokens, np.int32),
        )

    def put(self, chunk: TokenChunk) -> None:
        """Queue a chunk; its activations are cast to the storage dtype here, on the caller's thread.

        The writer thread itself runs no torch op: one would start a second OpenMP team whose threads spin
        on the cores the caller's next forward needs (capture: -16% tokens/s on 2 cores).
        """
        self._check()
        if chunk is not None:
            if chunk.ready is None:
                chunk.acts = {h: a.to(self.dtype) for h, a in chunk.acts.items()}
            elif any(a.dtype != self.dtype for a in chunk.acts.values()):
                raise ValueError(f"ShardWriter: a chunk in flight from the device must already be {self.dtype}")
        while True:
            try:
                self.q.put(chunk, timeout=1.0)
                return
            except queue.Full:
                self._check()

    def close(self) -> None:
        """Flush the last (partial) shard and stop the thread."""
        self.put(None)  # type: ignore[arg-type]
        self.thread.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def _run(self) -> None:
        try:
            set_thread_device(self.device)
            while True:
                chunk = self.q.get()
                if chunk is None:
                    if self.buf.n:
                        self._flush()
                    return
                self._append(chunk)
        except BaseException as e:  # handed to the main thread
            self.error = e
            while True:  # unblock a producer waiting on a full queue
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    break

    def _as_np(self, t: torch.Tensor) -> np.ndarray:
        if self._np_dtype is np.uint16:
            t = t.view(torch.int16)
        return t.numpy().view(self._np_dtype)

    def _append(self, chunk: TokenChunk) -> None:
        if chunk.ready is not None:
            chunk.ready.synchronize()
        acts = {h: self._as_np(chunk.acts[h]) for h in self.hooks}
        ids = chunk.token_ids.numpy().astype(np.int32, copy=False)
        row = 0
        for sid, pos0, n in zip(chunk.sentence_ids, chunk.first_positions, chunk.lengths):
            done = 0
            while done < n:  # a sentence may straddle shards
                b = self.buf
                take = min(n - done, self.shard_tokens - b.n)
                b.sentence_ids.append(sid)
                b.first_positions.append(pos0 + done)
                for h in self.hooks:
                    b.acts[h][b.n : b.n + take] = acts[h][row : row + take]
                b.token_ids[b.n : b.n + take] = ids[row : row + take]
                b.n += take
                b.starts.append(b.n)
                row += take
                done += take
                if b.n == self.shard_tokens:
                    self._flush()

    def _flush(self) -> None:
        b = self.buf
        tensors = {}
        for h in self.hooks:
            raw = torch.from_numpy(b.acts[h][: b.n])
            tensors[act_key(h)] = raw.view(self.dtype) if self._np_dtype is np.uint16 else raw
        tensors["token_ids"] = torch.from_numpy(b.token_ids[: b.n])
        tensors["sentence_ids"] = torch.tensor(b.sentence_ids, dtype=torch.int64)
        tensors["sentence_starts"] = torch.tensor(b.starts, dtype=torch.int64)
        tensors["sentence_first_position"] = torch.tensor(b.first_positions, dtype=torch.int32)
        name = shard_filename(self.rank, self.index)
        try:
            with atomic_path(self.out / name) as tmp:
                # One metadata key: safetensors writes a multi-key metadata map in hash order, which would
                # make identical shards differ byte for byte between runs.
                save_file(
                    tensors,
                    str(tmp),
                    metadata={"shard": json.dumps({"rank": self.rank, "index": self.index, "n_tokens": b.n})},
                )
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise PipelineInputError(
                    f"{self.out}: disk full while writing {name}; free space and re-run to resume"
                ) from None
            raise
        self.on_shard(
            {
                "file": name,
                "n_tokens": b.n,
                "n_sentences": len(b.sentence_ids),
                "sha256": sha256_file(self.out / name),
                "bytes": (self.out / name).stat().st_size,
            }
        )
        self.index += 1
        self.buf = self._new_buffer()


def sentence_rows(shard: dict[str, torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """(sentence_id, first_position, row_start, row_end) for each sentence piece in a loaded shard."""
    starts = shard["sentence_starts"].tolist()
    return [
        (int(s), int(p), starts[i], starts[i + 1])
        for i, (s, p) in enumerate(zip(shard["sentence_ids"].tolist(), shard["sentence_first_position"].tolist()))
    ]


@dataclass(frozen=True)
class CaptureOutput:
    """A finished capture folder, opened: the one reader of its manifest for every later stage."""

    directory: Path
    manifest: dict
    fingerprint: str
    hook_points: list[str]
    d_model: int
    storage_dtype: str
    """"torch.bfloat16", "torch.float16" or "torch.float32"."""
    model_dtype: str
    """The dtype the model ran in ("torch.bfloat16" / "torch.float32")."""
    model: dict
    """The model's identity (path, kind, config/tokenizer hashes, d_model)."""
    tokenizer_sha256: str
    tokenization: Tokenization
    """BOS and truncation (exclude_first_positions is preprocessing's choice: 0 here)."""
    max_sentences: int
    """The capture took the first N sentences of its dataset (0: all)."""
    sentences_dir: Path
    sentences_fingerprint: str
    """The sentence dataset's fingerprint: another stage reading "the same sentences" checks it."""
    tokens: int
    shards: list[dict]
    """Per shard: file, rank, n_tokens, n_sentences, sha256, bytes."""

    @property
    def shard_paths(self) -> list[Path]:
        return [self.directory / s["file"] for s in self.shards]

    @staticmethod
    def open(directory: str | Path) -> "CaptureOutput":
        """Validate a finished capture (every listed shard present; none unlisted) and read its fields."""
        directory = Path(directory)
        m = Fields(directory, read_manifest(directory, KIND))
        shards = m.get("shards", list)
        for s in shards:
            p = directory / s["file"]
            if not p.is_file():
                raise PipelineInputError(f"{p}: listed in {directory / 'manifest.json'} but missing")
        listed = {s["file"] for s in shards}
        strays = sorted(p.name for p in directory.glob(f"{SHARD_PREFIX}*.safetensors") if p.name not in listed)
        if strays:
            raise PipelineInputError(
                f"{directory}: shards {', '.join(strays[:3])} are not in its manifest (mixed captures?)"
            )
        return CaptureOutput(
            directory=directory,
            manifest=m.manifest,
            fingerprint=m.get("fingerprint", str),
            hook_points=m.get("hook_points", list),
            d_model=m.get("d_model", int),
            storage_dtype=m.get("storage_dtype", str),
            model_dtype=m.get("model_dtype", str),
            model=m.get("inputs.model", dict),
            tokenizer_sha256=m.get("tokenizer.sha256", str),
            tokenization=Tokenization(m.get("tokenization.add_bos", bool), m.get("tokenization.max_tokens", int)),
            max_sentences=m.get("selection.max_sentences", int),
            sentences_dir=Path(m.get("inputs.sentences.path", str)),
            sentences_fingerprint=m.get("inputs.sentences.fingerprint", str),
            tokens=m.get("counts.tokens", int),
            shards=shards,
        )

    def sentence_end(self, dataset_sentences: int) -> int:
        """Sentence ids [0, end) are in this capture (those of them with tokens)."""
        return min(self.max_sentences, dataset_sentences) if self.max_sentences else dataset_sentences

    def check_readable(self, hook_point: str) -> None:
        """Every shard's header parses and covers the file, and holds `hook_point` (one line naming the shard
        otherwise): a reader finds out before it starts, not halfway."""
        for path in self.shard_paths:
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
            except Exception as e:
                raise PipelineInputError(
                    f"{path}: not a readable activation shard ({str(e).splitlines()[0]})"
                ) from None
            if act_key(hook_point) not in keys:
                raise PipelineInputError(f"{path}: holds no {act_key(hook_point)} (keys: {', '.join(sorted(keys))})")

    def sentence_activations(self, hook_point: str, sentence_ids: Iterable[int]) -> dict[int, torch.Tensor]:
        """{sentence id: its stored activations [n_tokens, d_model] from text position 0, in the storage
        dtype} for the requested ids this capture holds. Reads each shard's small index and then only the
        rows of those sentences (memory-mapped slices), so a few sentences cost a few reads at any scale."""
        wanted = set(sentence_ids)
        key = act_key(hook_point)
        pieces: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for path in self.shard_paths:
            with safe_open(str(path), framework="pt") as f:
                sids = f.get_tensor("sentence_ids").tolist()
                if not wanted.intersection(sids):
                    continue
                starts = f.get_tensor("sentence_starts").tolist()
                firsts = f.get_tensor("sentence_first_position").tolist()
                rows = f.get_slice(key)
                for j, sid in enumerate(sids):
                    if sid in wanted:
                        pieces.setdefault(sid, []).append((firsts[j], rows[starts[j] : starts[j + 1]]))
        return {sid: torch.cat([a for _, a in sorted(p, key=lambda x: x[0])]) for sid, p in pieces.items()}

    def read_sentences(
        self, hook_point: str, rank: int = 0, world_size: int = 1, max_rows: int = 8192, slice_sentences: int = 1024
    ) -> Iterator["CapturedSentences"]:
        """Whole sentences, as the capture stored them, from every world_size-th shard (this reader's).

        A sentence belongs to the shard it starts in: a reader skips the piece a shard opens with when it
        continues a sentence from the previous shard, and reads the continuation of its own last sentence
        from the capture rank's next shards. So each sentence comes out once, over all readers. Rows are
        read in slices of ~max_rows and at most slice_sentences sentences (memory-mapped, in file order): memory
        grows with neither the shards nor the sentences' shortness (a reader's [n_latents, sentences] tables)."""
        by_rank = sorted(self.shards, key=lambda s: (s.get("rank", 0), s["file"]))
        key = act_key(hook_point)
        for at in range(rank, len(by_rank), world_size):
            path = self.directory / by_rank[at]["file"]
            following = [
                self.directory / s["file"] for s in by_rank[at + 1 :] if s.get("rank", 0) == by_rank[at].get("rank", 0)
            ]
            yield from _shard_sentences(path, following, key, max_rows, slice_sentences)


@dataclass
class CapturedSentences:
    """Consecutive whole sentences read back from a capture, rows packed sentence by sentence."""

    sentence_ids: list[int]
    starts: np.ndarray  # [B + 1] int64: sentence i's rows are [starts[i], starts[i+1])
    token_ids: np.ndarray  # [n] int32: the text tokens (BOS was never stored)
    acts: torch.Tensor  # [n, d_model] in the storage dtype


def _shard_sentences(
    path: Path, following: list[Path], key: str, max_rows: int, slice_sentences: int = 1024
) -> Iterator[CapturedSentences]:
    try:
        f = safe_open(str(path), framework="pt")
        index = {k: f.get_tensor(k).numpy() for k in ("sentence_ids", "sentence_starts", "sentence_first_position")}
        acts, tokens = f.get_slice(key), f.get_slice("token_ids")
    except Exception as e:
        raise PipelineInputError(f"{path}: not a readable activation shard ({str(e).splitlines()[0]})") from None
    sids, starts, firsts = index["sentence_ids"], index["sentence_starts"], index["sentence_first_position"]
    first = 1 if len(sids) and firsts[0] > 0 else 0  # the previous shard's sentence, read by its reader
    with f:
        while first < len(sids):
            last = first + 1  # at least one sentence per slice, at most ~max_rows rows
            while last < len(sids) and last - first < slice_sentences and starts[last + 1] - starts[first] <= max_rows:
                last += 1
            a, b = int(starts[first]), int(starts[last])
            chunk = CapturedSentences(
                [int(x) for x in sids[first:last]], starts[first : last + 1] - a, tokens[a:b].numpy(), acts[a:b]
            )
            if last == len(sids):  # the shard's last sentence may go on in the next shards
                chunk = _with_continuation(chunk, following, key)
            yield chunk
            first = last


def _with_continuation(chunk: CapturedSentences, following: list[Path], key: str) -> CapturedSentences:
    sid, tokens, acts = chunk.sentence_ids[-1], [chunk.token_ids], [chunk.acts]
    for path in following:
        rest = load_shard(path, ["sentence_ids", "sentence_first_position", "sentence_starts"])
        if not (
            len(rest["sentence_ids"]) and int(rest["sentence_ids"][0]) == sid and rest["sentence_first_position"][0] > 0
        ):
            break
        n = int(rest["sentence_starts"][1])
        with safe_open(str(path), framework="pt") as f:
            tokens.append(f.get_slice("token_ids")[:n].numpy())
            acts.append(f.get_slice(key)[:n])
        if len(rest["sentence_ids"]) > 1:  # the sentence ended inside this shard
            break
    if len(acts) == 1:
        return chunk
    starts = chunk.starts.copy()
    starts[-1] += sum(len(t) for t in tokens[1:])
    return CapturedSentences(chunk.sentence_ids, starts, np.concatenate(tokens), torch.cat(acts))


def load_shard(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load some or all tensors of one shard (memory-mapped reads)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys or list(f.keys()))}
    except Exception as e:
        raise PipelineInputError(f"{path}: not a readable activation shard ({str(e).splitlines()[0]})") from None
