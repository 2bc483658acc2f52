"""A training run folder (written by sae_training.py) and its one reader.

<dir>/manifest.json       kind "sae": config, data fingerprint, final validation, spliced evaluation
<dir>/metrics.jsonl       one JSON row per logged step (appended; a resume rewinds it)
<dir>/checkpoint/         state.safetensors + state.json: weights, optimizer, dead counters, RNG, position
<dir>/sae/                the final SAE (sae.py: sae.safetensors + cfg.json)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.manifest import Fields, read_manifest

KIND = "sae"
SAE_SUBDIR = "sae"
"""The trained SAE inside the run folder (what --sae takes)."""
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
RUN_FILE = "run.json"
"""The run in progress: its fingerprint and config (a resume checks them)."""
WANDB_ID_NAME = "wandb_run_id.txt"


@dataclass(frozen=True)
class TrainingRun:
    directory: Path
    manifest: dict
    fingerprint: str
    data_dir: Path
    """The preprocessing output it trained on."""
    steps: int
    final_validation: dict
    spliced_evaluation: dict

    @property
    def sae_dir(self) -> Path:
        return self.directory / SAE_SUBDIR

    @staticmethod
    def open(directory: str | Path) -> "TrainingRun":
        directory = Path(directory)
        m = Fields(directory, read_manifest(directory, KIND))
        return TrainingRun(
            directory=directory,
            manifest=m.manifest,
            fingerprint=m.get("fingerprint", str),
            data_dir=Path(m.get("inputs.data", str)),
            steps=m.get("counts.steps", int),
            final_validation=m.get("final_validation", dict),
            spliced_evaluation=m.get("spliced_evaluation", dict),
        )
