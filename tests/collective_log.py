"""What the 2-rank gloo tests add to a torchrun's environment so that it is held to NCCL's rules: every collective
checked and logged per rank (pipeline/core/device_check.py, installed by tests/device_check/sitecustomize.py), and the
check afterwards that every rank ran the same sequence of (op, shapes, dtypes)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.device_check import rank_sequences

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "tests" / "device_check"


def collective_env(log_dir: Path) -> dict:
    """Environment additions: the sitecustomize folder first on PYTHONPATH, the per-rank log folder."""
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "PIPELINE_COLLECTIVE_LOG": str(log_dir),
    }


def assert_ranks_agree(log_dir: Path, ranks: int) -> dict[int, list[dict]]:
    """Every rank logged, and the same collectives in the same order."""
    seqs = rank_sequences(log_dir)
    assert sorted(seqs) == list(range(ranks)), f"collective logs of ranks {sorted(seqs)}"
    assert seqs[0], "no collective ran"
    for r in range(1, ranks):
        assert seqs[r] == seqs[0], f"rank {r} ran other collectives than rank 0: {seqs[r][:5]} vs {seqs[0][:5]}"
    return seqs
