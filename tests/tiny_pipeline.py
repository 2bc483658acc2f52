"""The tiny pipeline the fault-injection and bad-input suites share: the real stage scripts, with the
arguments run_pipeline.py gives them, on the tiny random Llama and 30 Wikipedia summaries; plus a
snapshot of files that ignores what legitimately differs between runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from run_pipeline import PipelineConfig, stages

REPO = Path(__file__).resolve().parents[1]
VOLATILE = {
    "created",
    "sent_at",
    "throughput",
    "seconds",
    "train_seconds",
    "tokens_per_s",
    "train/tokens_per_s",
    "resumed",
    "outcome",
}
# What each stage writes (compared after a kill + re-run), and what must go before the stage runs again.
OUTPUTS = {
    "sentences": ["runs/sentences"],
    "capture": ["runs/activations"],
    "preprocessing": ["runs/preprocessed"],
    "training": ["runs/sae"],
    "top_sentences": ["runs/top_sentences"],
    "interpret_send": ["runs/interpretation"],
    "interpret_parse": [
        "latent_index_meaning",
        "runs/interpretation/explain/manifest.json",
        "runs/interpretation/explain/parse_failures.jsonl",
        "runs/interpretation/browser",
    ],
    "steering_eval": ["runs/steering_eval"],
}


def pipeline_config(model: Path) -> PipelineConfig:
    return PipelineConfig(
        model=str(model),
        max_sentences=0,
        stage_args=[
            "sentences:--max-documents=30",
            "sentences:--splitter=trained",
            "sentences:--punkt-train-chars=100000",
            "capture:--device=cpu",
            "capture:--model-dtype=float32",
            "capture:--shard-tokens=1500",
            "capture:--max-batch-tokens=512",
            "preprocessing:--batch-size=256",
            "training:--expansion=2",
            "training:--k=4",
            "training:--batch-size=256",
            "training:--wandb=disabled",
            "training:--device=cpu",
            "training:--val-every=5",
            "training:--checkpoint-every=3",
            "training:--epochs=3",
            "training:--eval-sentences=16",
            "top_sentences:--device=cpu",
            "top_sentences:--top-n=5",
            "top_sentences:--max-batch-tokens=256",
            "interpret_send:--min-sentences=2",
            "steering_eval:--n-candidates=2",
            "steering_eval:--max-new-tokens=4",
            "steering_eval:--device=cpu",
        ],
    )


def stage_argv(stage) -> list[str]:
    return [sys.executable, str(REPO / stage.script), *stage.args]


def run(stage, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run(stage_argv(stage), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def normalize(obj):
    if isinstance(obj, dict):
        return {k: normalize(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [normalize(v) for v in obj]
    return obj


def file_digest(path: Path) -> str:
    if path.suffix == ".json":
        return json.dumps(normalize(json.loads(path.read_text())), sort_keys=True)
    if path.suffix == ".jsonl":
        return "\n".join(
            json.dumps(normalize(json.loads(line)), sort_keys=True) for line in path.read_text().splitlines()
        )
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []
        for p in files:
            out[str(p.relative_to(root))] = file_digest(p)
    return out


def build_reference(root: Path, model: Path):
    """An uninterrupted run, stage by stage, with a snapshot of each stage's outputs right after it."""
    plan = {s.name: s for s in stages(pipeline_config(model))}
    snaps, seconds = {}, {}
    for name, stage in plan.items():
        t = time.perf_counter()
        done = run(stage, root)
        assert done.returncode == 0, f"{name}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        seconds[name] = time.perf_counter() - t
        if name in OUTPUTS:
            snaps[name] = snapshot(root, OUTPUTS[name])
    return root, plan, snaps, seconds
