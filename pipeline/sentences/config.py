"""The sentences stage's config (openwebtext_sentences_dataset.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.cli import check_choices
from pipeline.core.layout import SENTENCES_DIR
from pipeline.sentences.dataset import ROW_GROUP_SENTENCES


@dataclass
class SentencesConfig:
    out: str = field(default=str(SENTENCES_DIR), metadata={"fingerprint": False, "help": "output folder"})
    input: list[str] = field(
        default_factory=list,
        metadata={
            "fingerprint": False,
            "help": "local .txt/.jsonl/.parquet files or folders (default: embedded Wikipedia summaries)",
        },
    )
    hf_dataset: str | None = field(
        default=None,
        metadata={
            "fingerprint": False,
            "help": "Hugging Face dataset name or local path, streamed (e.g. Skylion007/openwebtext)",
        },
    )
    hf_config: str | None = field(default=None, metadata={"fingerprint": False, "help": "dataset config name"})
    hf_split: str = field(default="train", metadata={"fingerprint": False, "help": "dataset split"})
    text_column: str = field(
        default="text", metadata={"fingerprint": False, "help": "column/field holding the document text"}
    )
    title_column: str | None = field(
        default="title", metadata={"fingerprint": False, "help": "column/field holding a title, if any"}
    )
    max_documents: int = field(default=0, metadata={"help": "stop after this many documents (0: all)"})
    max_document_chars: int = field(default=1_000_000, metadata={"help": "longer documents are skipped and counted"})
    shard_sentences: int = field(
        default=262_144, metadata={"help": "sentences per parquet shard (shards end at document boundaries)"}
    )
    row_group_sentences: int = field(
        default=ROW_GROUP_SENTENCES,
        metadata={"help": "sentences per parquet row group: the readers' unit of work and of rank sharding"},
    )
    splitter: Literal["auto", "pretrained", "trained"] = field(
        default="auto",
        metadata={"help": "auto (pretrained English Punkt if installed, else trained), pretrained, trained"},
    )
    punkt_train_chars: int = field(
        default=20_000_000, metadata={"help": "characters of the corpus to train Punkt on, when trained"}
    )
    force: bool = field(
        default=False,
        metadata={"fingerprint": False, "help": "rebuild even if the output folder holds a (different) dataset"},
    )

    def __post_init__(self) -> None:
        check_choices(self)
