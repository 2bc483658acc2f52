"""Parse the interpretation answers into latent_index_meaning/, and score every explanation.

Usage:
    python interpret_top_sentences_parse_responses.py                   # meanings + offline (MiniLM) detection scores
    python interpret_top_sentences_parse_responses.py --judge none      # meanings only

Reads the explain task's raw results; extracts each verdict (JSON after an analysis, code fences,
integer or percent certainties) and validates it; every failure is kept with its reason in
<out>/explain/parse_failures.jsonl. Scores: detection by the offline judge (AUROC of MiniLM
similarity between the meaning and held-out activating vs. silent sentences) and, when the detect
task has answers, Claude's balanced accuracy; a second judge (e5) on a sample of latents. Writes
latent_index_meaning/<run>.json (highest detection score first; the file the browser, inference and
the Gradio page read) and a manifest, and writes the feature browser (runs/interpretation/browser/index.html)
with the meanings and scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.cli import parse_config, run_main
from pipeline.core.layout import BROWSER_NAME, STEERING_EVAL_DIR
from pipeline.core.manifest import MANIFEST_NAME
from pipeline.interpret.batches import task_dir
from pipeline.interpret.config import ParseConfig
from pipeline.interpret.parse import parse
from pipeline.report.feature_browser import browser_stale, write_browser
from pipeline.steering.results import RESULTS_NAME
from pipeline.top_sentences.tables import open_top_sentences


def main(cfg: ParseConfig) -> dict:
    counts = parse(cfg)
    if cfg.browser:  # (re)written when missing or older than the meanings or steering results it shows
        browser = Path(cfg.out) / BROWSER_NAME / "index.html"
        parsed = task_dir(cfg.out, "explain") / MANIFEST_NAME
        if browser_stale(browser, parsed, STEERING_EVAL_DIR / RESULTS_NAME):
            data = open_top_sentences(cfg.top_sentences)
            browser = write_browser(data, cfg.meanings, browser.parent, cfg.browser_sentences)
        print(f"feature browser: {browser.resolve()}")
    return counts


if __name__ == "__main__":
    run_main(main, parse_config(ParseConfig, sys.argv[1:], __doc__))
