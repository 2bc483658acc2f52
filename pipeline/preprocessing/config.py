"""The preprocessing stage's config (sae_preprocessing.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.layout import ACTIVATIONS_DIR, PREPROCESSED_DIR


@dataclass
class PreprocessConfig:
    capture: str = field(default=str(ACTIVATIONS_DIR), metadata={"help": "capture folder"})
    out: str = field(default=str(PREPROCESSED_DIR), metadata={"fingerprint": False, "help": "output folder"})
    hook_point: str | None = field(
        default=None, metadata={"help": "which captured hook point (default: the capture's first)"}
    )
    batch_size: int = field(default=1024, metadata={"help": "activations per training batch"})
    val_fraction: float = field(default=0.05, metadata={"help": "fraction of sentences held out"})
    seed: int = field(default=0, metadata={"help": "seed of the split and the shuffle"})
    exclude_first_positions: int = field(
        default=-1, metadata={"help": "exclude positions < N (attention sinks); -1: 1 without BOS, 0 with BOS"}
    )
    workers: int = field(default=2, metadata={"fingerprint": False, "help": "worker processes"})
    memory_gb: float = field(
        default=4.0,
        metadata={
            "fingerprint": False,
            "help": "memory budget of the shuffle, all workers together (the output does not depend on it)",
        },
    )
    force: bool = field(
        default=False, metadata={"fingerprint": False, "help": "overwrite an existing preprocessing output"}
    )
