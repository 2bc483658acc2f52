"""The training metrics: metrics.jsonl (rewound on resume) and, when enabled, the W&B run."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import atomic_path, read_jsonl
from pipeline.sae.config import TrainConfig
from pipeline.sae.training_run import METRICS_NAME, WANDB_ID_NAME


class MetricsLog:
    """metrics.jsonl always; W&B online/offline/disabled (offline without a key: never a login prompt)."""

    def __init__(self, out: Path, cfg: TrainConfig, enabled: bool, run_config: dict, resume_step: int = 0):
        self.path = out / METRICS_NAME
        self.enabled = enabled
        self.wandb = None
        if enabled:
            self.rewind(resume_step)
        mode = cfg.wandb if cfg.wandb != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.mode = mode
        if enabled and mode != "disabled":
            try:
                # imported only for a logged run: ~seconds, and optional
                import wandb
            except ImportError:
                raise PipelineInputError(
                    "--wandb: the wandb package is not installed (pip install wandb) or use --wandb disabled"
                ) from None
            id_file = out / WANDB_ID_NAME
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                id=run_id,
                resume="allow",
                mode=mode,
                dir=str(out),
                config=run_config,
                settings=wandb.Settings(login_timeout=0 if mode == "offline" else 30),
                reinit="create_new",  # a suite logs one W&B run per SAE from one process
            )

    def rewind(self, step: int) -> None:
        """Keep only rows up to the checkpoint's step: a killed run logged steps that the resumed
        run repeats, and a kill can cut the last line short."""
        if not self.path.is_file():
            return
        # the final row is written again at the end
        kept = [row for row in read_jsonl(self.path) if row.get("step", 0) <= step and not row.get("final")]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
