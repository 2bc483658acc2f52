"""Exact dataset statistics and shuffled training batches from a capture.

Usage (CPU; worker processes share the work, the result does not depend on how many):
    python sae_preprocessing.py                                    # runs/activations -> runs/preprocessed
    python sae_preprocessing.py --workers 8 --val-fraction 0.05 --seed 0 --batch-size 1024

One pass over the capture: every shard is checked against the capture manifest's sha256, its
training tokens are folded into float64 Welford/Chan moments and written, grouped by shuffle bucket,
to `train_acts.npy`; held-out sentences' tokens go to `val_acts.npy`. A second pass sorts each bucket
in memory: a seeded shuffle within --memory-gb whatever the data size, with only large sequential
reads and writes (pipeline/preprocessing/shuffle.py). Format and statistics: pipeline/preprocessing/preprocessed.py.

Massive activations: without BOS the first token of every sentence is the attention sink (norm
~100x the median). Policy: tokens at positions < --exclude-first-positions (default 1 for a capture
without BOS, 0 with BOS) are excluded from training, validation and statistics; the same rule is
recorded in the manifest for every later stage, with counts and the share of squared norm they held.
"""

from __future__ import annotations

import sys

from pipeline.core.cli import parse_config, run_main
from pipeline.preprocessing.config import PreprocessConfig
from pipeline.preprocessing.stage import preprocess


def main(cfg: PreprocessConfig) -> dict:
    return preprocess(cfg)


if __name__ == "__main__":
    run_main(main, parse_config(PreprocessConfig, sys.argv[1:], __doc__))
