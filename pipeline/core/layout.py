"""Where stage outputs go by default: everything under one runs/ folder (git-ignored)."""

from __future__ import annotations

from pathlib import Path

RUNS_DIR = Path("runs")
SENTENCES_DIR = RUNS_DIR / "sentences"
ACTIVATIONS_DIR = RUNS_DIR / "activations"
PREPROCESSED_DIR = RUNS_DIR / "preprocessed"
SAE_DIR = RUNS_DIR / "sae"
TOP_SENTENCES_DIR = RUNS_DIR / "top_sentences"
STEERING_EVAL_DIR = RUNS_DIR / "steering_eval"
