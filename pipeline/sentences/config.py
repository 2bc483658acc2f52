"""The sentences stage's config (openwebtext_sentences_dataset.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.cli import Runtime, check_choices
from pipeline.core.layout import SENTENCES_DIR
from pipeline.sentences.dataset import ROW_GROUP_SENTENCES


@dataclass
class SentencesConfig:
    out: Runtime[str] = str(SENTENCES_DIR)
    """Output folder."""
    input: Runtime[list[str]] = field(default_factory=list)
    """Local .txt/.jsonl/.parquet files or folders (default: embedded Wikipedia summaries)."""
    hf_dataset: Runtime[str | None] = None
    """Hugging Face dataset name or local path, streamed (e.g. Skylion007/openwebtext)."""
    hf_config: Runtime[str | None] = None
    """Dataset config name."""
    hf_split: Runtime[str] = "train"
    """Dataset split."""
    text_column: Runtime[str] = "text"
    """Column/field holding the document text."""
    title_column: Runtime[str | None] = "title"
    """Column/field holding a title, if any."""
    max_documents: int = 0
    """Stop after this many documents (0: all)."""
    max_document_chars: int = 1_000_000
    """Longer documents are skipped and counted."""
    shard_sentences: int = 262_144
    """Sentences per parquet shard (shards end at document boundaries)."""
    row_group_sentences: int = ROW_GROUP_SENTENCES
    """Sentences per parquet row group: the readers' unit of work and of rank sharding."""
    splitter: Literal["auto", "pretrained", "trained"] = "auto"
    """auto (pretrained English Punkt if installed, else trained), pretrained, trained."""
    punkt_train_chars: int = 20_000_000
    """Characters of the corpus to train Punkt on, when trained."""
    force: Runtime[bool] = False
    """Rebuild even if the output folder holds a (different) dataset."""

    def __post_init__(self) -> None:
        check_choices(self)
