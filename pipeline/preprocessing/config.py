"""The preprocessing stage's config (sae_preprocessing.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.cli import Runtime
from pipeline.core.layout import ACTIVATIONS_DIR, PREPROCESSED_DIR


@dataclass
class PreprocessConfig:
    capture: str = str(ACTIVATIONS_DIR)
    """Capture folder."""
    out: Runtime[str] = str(PREPROCESSED_DIR)
    """Output folder."""
    hook_point: str | None = None
    """Which captured hook point (default: the capture's first)."""
    batch_size: int = 1024
    """Activations per training batch."""
    val_fraction: float = 0.05
    """Fraction of sentences held out."""
    seed: int = 0
    """Seed of the split and the shuffle."""
    exclude_first_positions: int = -1
    """Exclude positions < N (attention sinks); -1: 1 without BOS, 0 with BOS."""
    sink_norm_ratio: float = -1.0
    """Also exclude tokens whose norm exceeds this x the median norm (massive activations: attention sinks past
    the first position); -1: 10 at residual-stream hook points, off at the others (a transcoder's input and
    target folders must keep the same rows); 0: off."""
    workers: Runtime[int] = 2
    """Worker processes."""
    memory_gb: Runtime[float] = 4.0
    """Memory budget of the shuffle, all workers together (the output does not depend on it)."""
    force: Runtime[bool] = False
    """Overwrite an existing preprocessing output."""
