"""Send one interpretation request per latent as Anthropic Message Batches (or explain offline).

Usage:
    python interpret_top_sentences_send_batches.py                       # explain every latent; offline without a key
    python interpret_top_sentences_send_batches.py --dry-run             # write the requests as JSONL, send nothing
    ANTHROPIC_API_KEY=... python interpret_top_sentences_send_batches.py --model claude-sonnet-4-5 --max-latents 500
    ANTHROPIC_API_KEY=... python interpret_top_sentences_send_batches.py --task detect   # Claude judge of the meanings

Then interpret_top_sentences_retrieve_batches.py and interpret_top_sentences_parse_responses.py.
Idempotent: a latent already submitted or answered is never sent again; one whose request errored,
expired or was canceled is sent again (next attempt). The key is read from ANTHROPIC_API_KEY by the
SDK and written nowhere. Without a key (or with --offline) the explain task runs the offline
explainer and records its answers in the same results format. Contract: pipeline/interpret/batches.py.
"""

from __future__ import annotations

import sys

from pipeline.core.cli import parse_config, run_main
from pipeline.interpret.config import SendConfig
from pipeline.interpret.send import send


def main(cfg: SendConfig) -> dict:
    return send(cfg)


if __name__ == "__main__":
    run_main(main, parse_config(SendConfig, sys.argv[1:], __doc__))
