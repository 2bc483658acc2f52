"""Process-group setup shared by every multi-process stage.

Launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the stages join a
process group: NCCL when the rank drives a CUDA device, gloo on CPU. Launched as a plain
`python script.py` they run as rank 0 of 1 with no process group at all, unless

    PIPELINE_FORCE_PROCESS_GROUP=1   a group of one (torchrun's rendezvous, else a file store), so every
                                     collective of the stage runs in a one-process run (the smoke, the tests)
    PIPELINE_DIST_TIMEOUT_S=600      how long a rank waits in a collective for the others (default 600 s)

A rank that fails aborts its NCCL group instead of leaving it gracefully (NCCL's destroy waits for the peers
its failure left behind), so its one-line error prints at once and torchrun stops the other ranks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _abort_process_group

from llama_3.errors import PipelineInputError
from pipeline.core.cli import resolve_device
from pipeline.core.device_check import emulated_backend
from pipeline.core.runtime import tune_glibc_malloc, use_deterministic_algorithms


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    group: bool = False
    """A process group exists: world > 1, or one forced by PIPELINE_FORCE_PROCESS_GROUP."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the stage runs its collectives (always with a group, even of one)."""
        return self.group or self.world_size > 1


FORCE_GROUP_ENV = "PIPELINE_FORCE_PROCESS_GROUP"
_store_dirs: list[str] = []  # a forced group's file store, removed at teardown


def _file_store_dir() -> str:
    _store_dirs.append(tempfile.mkdtemp(prefix="pipeline-pg-"))
    return _store_dirs[-1]


TIMEOUT_ENV = "PIPELINE_DIST_TIMEOUT_S"


def collective_timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise PipelineInputError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


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
    group = world > 1 or os.environ.get(FORCE_GROUP_ENV) == "1"
    if group and not dist.is_initialized():
        backend = emulated_backend() or ("nccl" if dev.type == "cuda" else "gloo")
        # torchrun sets MASTER_ADDR; a forced group of one in a plain `python script.py` rendezvouses in a file
        init = None if "MASTER_ADDR" in os.environ else f"file://{_file_store_dir()}/store"
        try:
            dist.init_process_group(
                backend=backend,
                init_method=init,
                world_size=world if init else -1,
                rank=rank if init else -1,
                timeout=collective_timeout(),
                device_id=dev if backend == "nccl" else None,
            )
        except PipelineInputError:
            raise
        except Exception as e:
            raise PipelineInputError(
                f"cannot join the torchrun process group ({backend}): {str(e).splitlines()[0]}"
            ) from None
    return DistInfo(rank, world, local_rank, local_world, dev, group)


def run_distributed(work: Callable[[Any, DistInfo], Any], cfg: Any) -> Any:
    """What every multi-process stage's main() does: tune malloc, join the group, work, leave it."""
    tune_glibc_malloc()
    if getattr(cfg, "deterministic", False):
        use_deterministic_algorithms()
    info = setup_distributed(cfg.device)
    try:
        result = work(cfg, info)
    except BaseException as e:
        teardown(info, failed=True)
        failure = collective_failure(e) if info.distributed else None
        if failure:
            raise PipelineInputError(
                f"rank {info.rank}: a collective failed ({failure}): another rank failed or hung past "
                f"{TIMEOUT_ENV}={collective_timeout().total_seconds():g}s; its own log says why"
            ) from None
        raise
    teardown(info)
    return result


def collective_failure(e: BaseException) -> str | None:
    """The first line of a collective's timeout or lost-peer error (gloo / NCCL), else None."""
    line = (str(e).splitlines() or [""])[0]
    signs = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "NCCL", "Watchdog")
    if isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(w in line for w in signs):
        return line[-300:]
    return None


SHARED_PROBE = ".rank0-probe"


def check_shared_folder(info: DistInfo, folder: Path, flag: str = "--out") -> None:
    """Every rank sees the files rank 0 writes in `folder`, or every rank stops now with one line.

    A multi-node run with a node-local folder would otherwise run to the end and fail only in rank 0's
    finalize, which cannot find the other nodes' files."""
    if not info.distributed:
        return
    probe = Path(folder) / SHARED_PROBE
    if info.is_main:
        probe.write_text(uuid.uuid4().hex)
    barrier(info)
    seen = probe.read_text() if probe.is_file() else ""
    mine = torch.tensor([zlib.crc32(seen.encode())], dtype=torch.long, device=info.device)
    everyone = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(everyone, mine)
    barrier(info)  # every rank has read it
    if info.is_main:
        probe.unlink(missing_ok=True)
    blind = [r for r, e in enumerate(everyone) if not torch.equal(e, everyone[0])]
    if blind:
        raise PipelineInputError(
            f"{flag} {folder}: rank(s) {blind} do not see the files rank 0 writes there (a node-local folder?); "
            "every node needs the same folder on a shared filesystem"
        )


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def teardown(info: DistInfo, failed: bool = False) -> None:
    """Leave the group: gracefully after success; after a failure NCCL's group is aborted, since its graceful
    destroy waits for the peers the failure left behind."""
    if info.distributed and dist.is_initialized():
        if failed and dist.get_backend() == "nccl":  # gloo's destroy does not wait; its abort terminates the process
            _abort_process_group()
        else:
            dist.destroy_process_group()
    while _store_dirs:
        shutil.rmtree(_store_dirs.pop(), ignore_errors=True)
