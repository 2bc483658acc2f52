"""Process-group setup shared by every multi-process stage.

Launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the stages join a
process group: NCCL when the rank drives a CUDA device, gloo on CPU. Launched as a plain
`python script.py` they run as rank 0 of 1 with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from llama_3.cli import resolve_device
from llama_3.errors import PipelineInputError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick this rank's device and CPU threads."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    elif local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; oversubscription slows every rank down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        except Exception as e:
            raise PipelineInputError(
                f"cannot join the torchrun process group ({backend}): {str(e).splitlines()[0]}"
            ) from None
    return DistInfo(rank, world, local_rank, local_world, dev)


def run_distributed(work: Callable[[Any, DistInfo], Any], cfg: Any) -> Any:
    """What every multi-process stage's main() does: tune malloc, join the group, work, leave it."""
    from pipeline.runtime import tune_glibc_malloc

    tune_glibc_malloc()
    info = setup_distributed(cfg.device)
    try:
        return work(cfg, info)
    finally:
        teardown(info)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
