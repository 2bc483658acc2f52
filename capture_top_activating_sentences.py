"""Top-activating sentences for every latent of an SAE, per-latent statistics, and a static feature browser.

Usage:
    # CPU or one GPU; defaults: runs/sae/sae on runs/sentences -> runs/top_sentences (+ browser/index.html)
    python capture_top_activating_sentences.py
    python capture_top_activating_sentences.py --top-n 100 --max-sentences 0          # every sentence
    python capture_top_activating_sentences.py --source model --force                # run the model anyway
    torchrun --nproc_per_node 8 capture_top_activating_sentences.py --model ~/models/Llama-3.2-3B \
        --sae runs/sae/sae --sentences runs/owt_sentences

Reads the SAE's input activations back from the capture it was trained from, where that capture holds
the requested sentences as the SAE saw them (--source auto, the default; pipeline/top_sentences/sources.py),
and streams the other sentences through the model to the SAE's hook point (capture-only forward).
For every latent it keeps the top N sentences under each aggregation over the sentence's tokens
(mean, max, last token) on the device, the latent's per-token activations in those sentences,
firing frequency, mean activation when active, a log-spaced activation histogram, and a fixed
sample of sentences where it never fires (for scoring explanations). Ranks take every
world_size-th row group (or capture shard); their tables merge exactly (ties: lower sentence id first).

Default sentence set: the sentences the SAE's training capture covered (its held-out sentences
plus its training sentences), read from the run's manifests; --max-sentences N overrides.
Tables: pipeline/top_sentences/tables.py. Browser: pipeline/report/feature_browser.py.
"""

from __future__ import annotations

import sys

from pipeline.core.cli import parse_config, run_main
from pipeline.core.distributed import run_distributed
from pipeline.top_sentences.config import TopSentencesConfig
from pipeline.top_sentences.stage import (
    collect,
)


def main(cfg: TopSentencesConfig) -> dict:
    return run_distributed(collect, cfg)


if __name__ == "__main__":
    run_main(main, parse_config(TopSentencesConfig, sys.argv[1:], __doc__))
