"""Train a TopK SAE on preprocessed activations (CPU, one GPU, or torchrun DDP).

Usage:
    python sae_training.py                                   # runs/preprocessed -> runs/sae, 8x expansion, k=32
    python sae_training.py --expansion 16 --k 64 --epochs 4 --wandb offline
    torchrun --nproc_per_node 8 sae_training.py --data runs/owt_preprocessed --batch-size 8192

Every global batch is split evenly over the ranks; each rank's loss is its share of the global
mean, gradients are all-reduced (sum), so every rank takes the same optimizer step as one process
on the whole batch would. Decoder rows stay unit-norm per latent: the gradient component along each
row is projected out before the step and the rows are renormalised after it. Aux-k (coefficient
1/32) reconstructs the residual from latents that have not fired for --dead-tokens tokens (counted
globally across ranks). Checkpoints (atomic, safetensors + JSON, no pickle) hold weights,
optimizer, schedule, dead counters, RNG state and data position; --resume continues exactly.
"""

from __future__ import annotations

import sys

from pipeline.core.cli import parse_config, run_main
from pipeline.core.distributed import run_distributed
from pipeline.sae.config import TrainConfig
from pipeline.sae.stage import train


def main(cfg: TrainConfig) -> dict:
    return run_distributed(train, cfg)


if __name__ == "__main__":
    run_main(main, parse_config(TrainConfig, sys.argv[1:], __doc__))
