"""run_pipeline.py: every stage reused on a finished run, --force-from recomputes from a stage on,
the report has its plots, and the summary points at the report, the browser and the Gradio page."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_pipeline import REPO, pipeline_config


def driver_argv(model: Path, *extra: str) -> list[str]:
    cfg = pipeline_config(model)
    return [
        sys.executable,
        str(REPO / "run_pipeline.py"),
        "--model",
        cfg.model,
        "--max-sentences",
        str(cfg.max_sentences),
        "--stage-args",
        *cfg.stage_args,
        *extra,
    ]


@pytest.mark.slow
def test_rerun_reuses_every_stage_and_force_from_recomputes_the_rest(tiny_pipeline, tiny, tmp_path):
    root, plan, snaps, _ = tiny_pipeline
    work = tmp_path / "run"
    shutil.copytree(root, work)
    done = subprocess.run(driver_argv(tiny.hf_dir), cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((work / "runs" / "pipeline.json").read_text())
    assert [s["name"] for s in doc["stages"]] == list(plan)
    reused = {s["name"] for s in doc["stages"] if s["reused"]}
    assert reused == set(plan) - {"interpret_retrieve"}  # retrieve only reads the state: nothing to reuse
    assert all(s["peak_rss_mb"] > 50 and s["seconds"] > 0 for s in doc["stages"])
    report = work / "runs" / "report"
    for png in (
        "loss.png",
        "aux_k.png",
        "fvu.png",
        "ce_recovered.png",
        "density.png",
        "detection.png",
        "steering.png",
    ):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f'src="{png}"' in (report / "index.html").read_text()
    assert (
        "report:" in done.stdout
        and "feature browser:" in done.stdout
        and "llama_3_inference_text_completion_gradio.py" in done.stdout
    )
    # the browser (written by the parse stage) was rewritten after the steering evaluation: each steered latent's page
    # holds its held-out rows beside the unsteered text, as the report does
    results = json.loads((work / "runs" / "steering_eval" / "results.json").read_text())
    steered = results["latents"][0]["latent"]
    page = (work / "runs" / "interpretation" / "browser" / "latents" / f"{steered}.html").read_text()
    row = next(r for r in results["rows"] if r["latent"] == steered and r["method"] == "sae" and r["phase"] == "test")
    assert "Steering (this SAE's evaluation" in page and html.escape(row["text"]) in page
    assert html.escape(row["text"]) in (report / "index.html").read_text()
    summary = json.loads((report / "summary.json").read_text())
    sae_manifest = json.loads((work / "runs" / "sae" / "manifest.json").read_text())
    assert summary["training"]["val_fvu"] == sae_manifest["final_validation"]["val/fvu"]
    # the headline table says the same numbers; no L0 plot (TopK: it is k)
    index = (report / "index.html").read_text()
    assert f"<td>FVU</td><td>{summary['training']['val_fvu']:.3f}</td>" in index
    assert f"<td>dead latents</td><td>{summary['training']['val_dead_pct']:.1f}%</td>" in index
    assert "l0_fvu.png" not in index and "latents active per token" in index

    before = (work / "runs" / "steering_eval" / "results.json").stat().st_mtime_ns
    done = subprocess.run(
        driver_argv(tiny.hf_dir, "--force-from", "steering_eval"), cwd=work, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((work / "runs" / "pipeline.json").read_text())
    assert [s["name"] for s in doc["stages"] if s["forced"]] == ["steering_eval"]
    # read from each stage's manifest ("outcome"), not from what it printed
    assert {s["name"] for s in doc["stages"] if s["reused"]} == set(plan) - {"interpret_retrieve", "steering_eval"}
    assert (work / "runs" / "steering_eval" / "results.json").stat().st_mtime_ns != before


def test_bad_driver_flags(tmp_path):
    for extra, message in (
        (["--force-from", "nope"], "--force-from 'nope'"),
        (["--stage-args", "training:expansion=2"], "--stage-args"),
    ):
        done = subprocess.run(
            [sys.executable, str(REPO / "run_pipeline.py"), *extra], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), (
            done.stderr
        )
