"""Capture residual-stream activations of every sentence into fixed-size, memory-mappable shards.

Usage:
    # CPU or one GPU; embedded defaults: runs/sentences -> runs/activations at resid_pre.25 of SmolLM2
    python capture_activations.py
    python capture_activations.py --max-sentences 8192                 # a token budget for a quick demo
    python capture_activations.py --hook-points resid_pre.20 attn_norm.20 --storage-dtype float32
    # several processes (gloo on CPU, NCCL on GPUs); multi-node: the usual torchrun rendezvous flags
    torchrun --nproc_per_node 8 capture_activations.py --model ~/models/Llama-3.2-3B --sentences runs/owt_sentences

Each rank takes every world_size-th row group of the sentence dataset, runs a capture-only forward
(no block after the last hook point) on length-sorted batches, and hands packed real-token
activations to a background writer. Killing the run at any point and starting it again resumes
with the same number of ranks; shard format: pipeline/capture/activations.py.

CPU default model dtype: bf16 where the CPU has native bf16 matmuls (AMX / AVX-512 BF16; several
times faster, ~0.4% relative error per activation), else fp32. Storage defaults to bf16.
"""

from __future__ import annotations

import sys

from pipeline.capture.config import CaptureConfig
from pipeline.capture.stage import capture
from pipeline.core.cli import parse_config, run_main
from pipeline.core.distributed import run_distributed


def main(cfg: CaptureConfig) -> dict:
    return run_distributed(capture, cfg)


if __name__ == "__main__":
    run_main(main, parse_config(CaptureConfig, sys.argv[1:], __doc__))
