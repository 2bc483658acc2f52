"""Hardware-dependent choices made once per process: the fast CPU dtype and glibc's allocator."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

from llama_3.cpu_features import cuda_native_bf16, has_native_bf16

log = logging.getLogger(__name__)


def forward_batch_tokens(device: torch.device) -> int:
    """Padded tokens per capture-only forward when the flag says 0 (auto).

    CPU: 2,048. A [M, 576] x [576, N] fp32 linear of SmolLM2 ran at 255 / 209 / 188 GFLOP/s for
    M = 1,024 / 2,048 / 8,192 on a 2-core Xeon (bf16 on AMX: 1,453 / 1,153 / 628), its activations
    falling out of cache as M grows; the capture stage at 2,048 ran at 95% of bench_llama's 16 x 64
    figure in fp32, at 8,192 (the old default) at 81%. CUDA: 8,192 (unchanged; GPUs want big batches)."""
    return 8192 if device.type == "cuda" else 2048


def capture_dtype(device: torch.device) -> torch.dtype:
    """The model dtype for capture-only forwards: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if cuda_native_bf16() else torch.float16
    return torch.bfloat16 if has_native_bf16() else torch.float32


def set_thread_device(device: torch.device | None) -> None:
    """A new thread's CUDA calls go to cuda:0 until it names its rank's GPU: on every other rank the first one
    (an event wait, a pinned allocation) would open a CUDA context (~0.5 GB) on GPU 0."""
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)


def use_deterministic_algorithms() -> None:
    """--deterministic: the same inputs give the same bits on a GPU too, at some speed.

    CUDA picks cuBLAS kernels by shape and sums `index_add_` (training's b_enc gradient, top sentences'
    statistics) with atomics in whatever order threads arrive, so two runs, a resumed and an uninterrupted
    one, or the capture- and model-sourced top sentences agree only to fp32 rounding. In deterministic mode
    torch takes its deterministic kernels (index_add_ sorts, then sums) and cuBLAS a fixed workspace; an op
    without one raises. Set before the first CUDA call (cuBLAS reads CUBLAS_WORKSPACE_CONFIG at its start)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def tune_glibc_malloc() -> bool:
    """Keep large freed blocks in the heap instead of returning them to the OS after every op.

    Each forward allocates and frees the same multi-MB activations; with glibc's defaults every
    one is a fresh mmap whose pages fault in zeroed (up to 1.5x slower on small VMs). The same as
    setting MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ before start. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        # 32 MiB is glibc's ceiling for the mmap threshold on 64-bit.
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except OSError:
        return False
    if not ok:
        log.debug("mallopt refused; keeping glibc's defaults")
    return ok


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim). A long streaming loop of varied
    allocation sizes leaves freed memory scattered through the heap, which otherwise stays resident:
    top sentences' RSS grew 1.4x over a 16x larger corpus with no live memory growing. No-op off glibc."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
