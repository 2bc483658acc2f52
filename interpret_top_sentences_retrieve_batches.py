"""Poll the submitted Message Batches and download the results of those that have ended.

Usage:
    python interpret_top_sentences_retrieve_batches.py                  # one pass: fetch what has ended
    python interpret_top_sentences_retrieve_batches.py --wait           # poll until every batch has ended
    python interpret_top_sentences_retrieve_batches.py --task detect --wait --poll-seconds 30

Every result type is recorded per request (succeeded, errored, canceled, expired); raw result
lines are kept in <out>/<task>/results/<batch id>.jsonl, written atomically, so a re-run fetches
only batches that have no results file yet. Errored, expired and canceled latents are sent again by
the send script. 429 and 5xx answers are retried with backoff by the SDK (--max-retries).
"""

from __future__ import annotations

import sys

from pipeline.core.cli import parse_config, run_main
from pipeline.interpret.config import RetrieveConfig
from pipeline.interpret.retrieve import retrieve


def main(cfg: RetrieveConfig) -> dict:
    return retrieve(cfg)


if __name__ == "__main__":
    run_main(main, parse_config(RetrieveConfig, sys.argv[1:], __doc__))
