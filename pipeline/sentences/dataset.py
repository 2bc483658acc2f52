"""The sentence dataset: its on-disk format, and the tokenized, length-batched, rank-sharded reader.

On disk (written by openwebtext_sentences_dataset.py):
    <dir>/manifest.json                       kind "sentences": source, splitter, counts, shards
    <dir>/sentences-00000.parquet ...         SCHEMA below, row groups of ROW_GROUP_SENTENCES rows
    <dir>/punkt_params.json                   the trained splitter, when no pretrained one was installed

sentence_id is global, dense (0..N-1) and follows the source order; doc_id likewise for
documents; sentence_index counts sentences within a document; char_start is the sentence's
offset in its document's text.

The reader's unit of work is one parquet row group (a contiguous sentence-id range). Units go to
ranks round-robin (unit i -> rank i % world_size), then to DataLoader workers the same way, so the
split is deterministic and disjoint whatever the corpus size, and memory holds one row group.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from llama_3.errors import PipelineInputError
from llama_3.tokenizer import Tokenizer
from pipeline.core.manifest import Fields, read_manifest
from pipeline.core.tokenization import DEFAULT_MAX_TOKENS

KIND = "sentences"
ROW_GROUP_SENTENCES = 4096
SCHEMA = pa.schema(
    [
        ("sentence_id", pa.int64()),
        ("doc_id", pa.int64()),
        ("sentence_index", pa.int32()),
        ("char_start", pa.int64()),
        ("text", pa.string()),
        ("doc_key", pa.string()),
        ("title", pa.string()),
        ("topic", pa.string()),
    ]
)


def shard_filename(index: int) -> str:
    return f"sentences-{index:05d}.parquet"


@dataclass(frozen=True)
class ReadUnit:
    """One parquet row group: sentence ids [first_sentence_id, first_sentence_id + n_rows)."""

    path: Path
    row_group: int
    first_sentence_id: int
    n_rows: int


@dataclass(frozen=True)
class SentenceDataset:
    """A finished sentence dataset, opened: the one reader of its manifest for every later stage."""

    directory: Path
    manifest: dict
    fingerprint: str
    n_sentences: int
    units: list[ReadUnit]
    """Its parquet row groups in sentence-id order."""

    @staticmethod
    def open(directory: str | Path) -> "SentenceDataset":
        """Validate a finished sentence dataset and list its read units in sentence-id order."""
        directory = Path(directory)
        m = Fields(directory, read_manifest(directory, KIND))
        n_sentences = m.get("counts.sentences", int)
        units: list[ReadUnit] = []
        next_id = 0
        for shard in m.get("shards", list):
            path = directory / shard["file"]
            if not path.is_file():
                raise PipelineInputError(f"{path}: listed in {directory / 'manifest.json'} but missing")
            # The size, not the sha256: every reader (each rank and DataLoader worker) opens the dataset, and
            # hashing an OpenWebText-sized corpus each time would cost minutes; zstd pages catch corruption.
            if "bytes" in shard and path.stat().st_size != shard["bytes"]:
                raise PipelineInputError(
                    f"{path}: {path.stat().st_size} bytes, {directory / 'manifest.json'} says {shard['bytes']} "
                    "(truncated or overwritten); rebuild the sentence dataset with --force"
                )
            try:
                md = pq.ParquetFile(path).metadata
            except Exception as e:
                raise PipelineInputError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
            if md.num_rows != shard["rows"] or shard["first_sentence_id"] != next_id:
                raise PipelineInputError(
                    f"{path}: has {md.num_rows} rows from id {shard['first_sentence_id']}, the manifest expects "
                    f"{shard['rows']} from {next_id}"
                )
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                units.append(ReadUnit(path, rg, next_id, n))
                next_id += n
        if next_id != n_sentences:
            raise PipelineInputError(f"{directory}: shards hold {next_id} sentences, the manifest says {n_sentences}")
        return SentenceDataset(directory, m.manifest, m.get("fingerprint", str), n_sentences, units)


def read_unit(unit: ReadUnit, columns: list[str]) -> dict[str, list]:
    try:
        table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=columns)
    except (OSError, ValueError, pa.ArrowException) as e:  # corrupted pages: bad compression, bad checksums
        raise PipelineInputError(
            f"{unit.path}: row group {unit.row_group} cannot be read ({str(e).splitlines()[0]}); "
            "the file is corrupted: rebuild the sentence dataset with --force"
        ) from None
    return table.to_pydict()


def iter_sentences(
    directory: str | Path, columns: tuple[str, ...] = ("sentence_id", "text")
) -> Iterator[dict[str, list]]:
    """All sentences in id order, one row group (as a dict of columns) at a time."""
    for u in SentenceDataset.open(directory).units:
        yield read_unit(u, list(columns))


def sentence_texts(directory: str | Path, ids) -> list[str]:
    """The texts of these sentence ids, in id order; reading stops once all are found."""
    wanted, texts = set(ids), []
    for part in iter_sentences(directory):
        texts += [t for s, t in zip(part["sentence_id"], part["text"]) if s in wanted]
        if len(texts) >= len(wanted):
            break
    return texts


@dataclass
class SentenceBatch:
    tokens: torch.Tensor
    """[B, T] token ids, right-padded with the tokenizer's pad id (padding never precedes real tokens)."""
    lengths: torch.Tensor
    """[B] real tokens per row (after truncation)."""
    sentence_ids: torch.Tensor
    """[B] global sentence ids."""
    truncated: torch.Tensor
    """[B] bool: the sentence had more than max_tokens tokens and was cut."""

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def length_batches(lengths: list[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Greedy batches over indices in the given order: padded size (rows x longest) stays within budget."""
    batches, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        if cur and (len(cur) + 1 > max_batch_size or (len(cur) + 1) * new_longest > max_batch_tokens):
            batches.append(cur)
            cur, new_longest = [], n
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    return batches


class SentenceTokenDataset(IterableDataset):
    """Sentences of a dataset, tokenized and batched by length, for one rank of `world_size`.

    Yields SentenceBatch objects (use DataLoader(batch_size=None)). Within each row group,
    sentences are sorted by token count (ties by id) before batching, so padding is small.
    `stats` counts sentences, tokens and truncations seen by this process.
    """

    def __init__(
        self,
        directory: str | Path,
        tokenizer: Tokenizer,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        add_bos: bool = False,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        sort_by_length: bool = True,
        max_sentences: int = 0,
        first_sentence: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise PipelineInputError(f"rank {rank} is out of range for world_size {world_size}")
        if max_tokens < 1 or max_batch_tokens < max_tokens or max_batch_size < 1:
            raise PipelineInputError(
                f"--max-tokens {max_tokens} / --max-batch-tokens {max_batch_tokens} / --max-batch-size "
                f"{max_batch_size}: need max-tokens >= 1, max-batch-tokens >= max-tokens, max-batch-size >= 1"
            )
        self.dataset = SentenceDataset.open(directory)
        self.fingerprint = self.dataset.fingerprint
        all_units = self.dataset.units
        if max_sentences:  # the first max_sentences sentence ids, whatever the number of ranks
            all_units = [
                u
                if u.first_sentence_id + u.n_rows <= max_sentences
                else ReadUnit(u.path, u.row_group, u.first_sentence_id, max_sentences - u.first_sentence_id)
                for u in all_units
                if u.first_sentence_id < max_sentences
            ]
        # ids below first_sentence are another source's (top sentences reads them from a capture)
        self.first_sentence = first_sentence
        all_units = [u for u in all_units if u.first_sentence_id + u.n_rows > first_sentence]
        self.tokenizer = tokenizer
        self.max_tokens, self.add_bos = max_tokens, add_bos
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.sort_by_length = sort_by_length
        self.rank, self.world_size = rank, world_size
        self.units = all_units[rank::world_size]
        self.stats: Counter = Counter()

    @property
    def n_sentences(self) -> int:
        """Sentences this rank will see."""
        return sum(u.n_rows - max(0, self.first_sentence - u.first_sentence_id) for u in self.units)

    def _worker_units(self) -> list[ReadUnit]:
        info = get_worker_info()
        return self.units if info is None else self.units[info.id :: info.num_workers]

    def __iter__(self) -> Iterator[SentenceBatch]:
        pad = self.tokenizer.pad_id
        for unit in self._worker_units():
            cols = read_unit(unit, ["sentence_id", "text"])
            skip = max(0, self.first_sentence - unit.first_sentence_id)
            cols = {k: v[skip : unit.n_rows] for k, v in cols.items()}  # a unit cut by max/first sentence
            ids = self.tokenizer.encode_batch(cols["text"], bos=self.add_bos)
            full = [len(t) for t in ids]
            ids = [t[: self.max_tokens] for t in ids]
            order = list(range(len(ids)))
            if self.sort_by_length:
                order.sort(key=lambda i: (len(ids[i]), cols["sentence_id"][i]))
            lengths = [len(ids[i]) for i in order]
            for rows in length_batches(lengths, self.max_batch_tokens, self.max_batch_size):
                idx = [order[r] for r in rows]
                T = max(len(ids[i]) for i in idx)
                tokens = torch.full((len(idx), T), pad, dtype=torch.long)
                for row, i in enumerate(idx):
                    tokens[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                batch = SentenceBatch(
                    tokens=tokens,
                    lengths=torch.tensor([len(ids[i]) for i in idx]),
                    sentence_ids=torch.tensor([cols["sentence_id"][i] for i in idx]),
                    truncated=torch.tensor([full[i] > self.max_tokens for i in idx]),
                )
                self.stats["sentences"] += len(idx)
                self.stats["tokens"] += batch.n_tokens
                self.stats["padded_tokens"] += tokens.numel()
                self.stats["truncated_sentences"] += int(batch.truncated.sum())
                yield batch
