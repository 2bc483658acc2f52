"""The whole pipeline in one command, then a report: every stage script in order, each in its own
process (so its wall time and peak memory are measured), each reusing its finished output.

Usage:
    # CPU, embedded default (SmolLM2-135M-Instruct, Wikipedia summaries), offline explainer
    python run_pipeline.py
    # recompute everything, or from one stage on (earlier stages are reused)
    python run_pipeline.py --force
    python run_pipeline.py --force-from training
    # explain with Claude Message Batches (needs ANTHROPIC_API_KEY; waits for the batches to end)
    python run_pipeline.py --claude
    # only rebuild the report from what is on disk
    python run_pipeline.py --report-only
GPUs: run the stages themselves with torchrun (README, "8 GPUs"); this driver runs one process per stage.
Output: runs/pipeline.json (stage timings and memory) and runs/report/index.html.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from llama_3.cpu_features import cpu_name
from llama_3.errors import PipelineInputError
from pipeline.core.cli import parse_config, run_main
from pipeline.core.layout import (
    ACTIVATIONS_DIR,
    BROWSER_DIR,
    INTERPRETATION_DIR,
    MEANINGS_DIR,
    PREPROCESSED_DIR,
    RUNS_DIR,
    SAE_DIR,
    SENTENCES_DIR,
    STEERING_EVAL_DIR,
    TOP_SENTENCES_DIR,
)
from pipeline.core.layout import DEFAULT as DEFAULT_LAYOUT
from pipeline.core.manifest import MANIFEST_NAME, make_manifest, write_json_atomic
from pipeline.interpret.config import ParseConfig
from pipeline.report.feature_browser import browser_stale, write_browser
from pipeline.report.report import read_json, write_report
from pipeline.steering.results import RESULTS_NAME
from pipeline.top_sentences.tables import open_top_sentences

REPO = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    args: tuple[str, ...] = ()
    forceable: bool = True
    """Takes --force (the retrieve and parse steps have nothing to force: they follow the state)."""
    out: Path | None = None
    """The stage's default output folder (its --out); None: the stage has no reusable output."""
    record: str = MANIFEST_NAME
    """The file in it whose "outcome" says whether the stage computed or reused its output."""

    def outcome_file(self) -> Path | None:
        out = self.out
        for flag, value in zip(self.args, self.args[1:]):  # --stage-args STAGE:--out=DIR moves it
            if flag == "--out":
                out = Path(value)
        return None if out is None else out / self.record


def stages(cfg: "PipelineConfig") -> list[Stage]:
    send = ("--offline",) if not cfg.claude else ()
    retrieve = ("--wait", "--poll-seconds", "60") if cfg.claude else ()
    judge = ("--judge", "claude") if cfg.claude else ()  # Claude rates the steering evaluation too
    model = ("--model", cfg.model) if cfg.model else ()
    capture = ("--max-sentences", str(cfg.max_sentences), *model)
    plan = [
        Stage("sentences", "openwebtext_sentences_dataset.py", out=SENTENCES_DIR),
        Stage("capture", "capture_activations.py", capture, out=ACTIVATIONS_DIR),
        Stage("preprocessing", "sae_preprocessing.py", out=PREPROCESSED_DIR),
        # The demo trains on ~226k tokens: at the default 10M no latent could ever count as dead.
        # aux-k from 20k silent tokens at 1/8 (not the 10M / 1/32 of long runs): 7.4% dead instead of 13.5% on
        # the demo's 202 steps, FVU and the well-explained latents unchanged (docs/pipeline.md, "Dead latents")
        Stage("training", "sae_training.py", ("--dead-tokens", "20000", "--aux-coef", "0.125"), out=SAE_DIR),
        Stage("top_sentences", "capture_top_activating_sentences.py", out=TOP_SENTENCES_DIR),
        Stage(
            "interpret_send",
            "interpret_top_sentences_send_batches.py",
            send,
            out=INTERPRETATION_DIR,
            record="explain/send_manifest.json",
        ),
        Stage("interpret_retrieve", "interpret_top_sentences_retrieve_batches.py", retrieve, forceable=False),
        Stage(
            "interpret_parse",
            "interpret_top_sentences_parse_responses.py",
            forceable=False,
            out=INTERPRETATION_DIR,
            record=f"explain/{MANIFEST_NAME}",
        ),
        Stage("steering_eval", "steering_evaluation.py", judge, out=STEERING_EVAL_DIR),
    ]
    extra: dict[str, list[str]] = {}
    for item in cfg.stage_args:
        name, sep, flag = item.partition(":")
        if not sep or not flag.startswith("--") or name not in {s.name for s in plan}:
            raise PipelineInputError(
                f"--stage-args {item!r}: expected STAGE:--flag[=value] with STAGE one of "
                f"{', '.join(s.name for s in plan)}"
            )
        extra.setdefault(name, []).extend(flag.split("=", 1))
    return [replace(s, args=(*s.args, *extra.get(s.name, []))) for s in plan]


@dataclass
class PipelineConfig:
    max_sentences: int = 8192
    """Sentences captured for SAE training (0: all)."""
    force: bool = False
    """Recompute every stage."""
    force_from: str | None = None
    """Recompute this stage and every later one."""
    claude: bool = False
    """Explain, and judge the steering, with Claude batches (ANTHROPIC_API_KEY); wait for them."""
    report_only: bool = False
    """Only rebuild runs/report from the outputs on disk."""
    model: str | None = None
    """Checkpoint to capture from (later stages follow the SAE's model); default: embedded SmolLM2."""
    stage_args: list[str] = field(default_factory=list)
    """Extra flags for one stage, STAGE:FLAG[=VALUE], e.g. training:--expansion=16 sentences:--max-documents=500."""


def run_stage(stage: Stage, force: bool) -> dict:
    """Run one stage script; returns its timing, peak RSS and whether it reused its output."""
    argv = [sys.executable, str(REPO / stage.script), *stage.args, *(["--force"] if force and stage.forceable else [])]
    print(f"\n=== {stage.name}: {' '.join(Path(a).name if a.endswith('.py') else a for a in argv[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, bufsize=1
    )  # outputs go under ./runs, as for each script
    try:
        for line in proc.stdout:  # echo the stage's own output; its progress bars go to stderr directly
            print(line, end="", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux: this child's own peak (its torchrun-free, single process)
    record = {
        "name": stage.name,
        "script": stage.script,
        "args": list(stage.args),
        "forced": force and stage.forceable,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "reused": proc.returncode == 0 and stage_outcome(stage) == "reused",
        "exit_code": proc.returncode,
    }
    if proc.returncode != 0:
        raise StageFailed(record)
    return record


def stage_outcome(stage: Stage) -> str | None:
    """ "computed" or "reused", as the stage recorded it in its output's manifest (None: no record)."""
    path = stage.outcome_file()
    try:
        return json.loads(path.read_text()).get("outcome") if path is not None else None
    except (OSError, ValueError, AttributeError):
        return None


class StageFailed(Exception):
    def __init__(self, record: dict):
        super().__init__(f"stage {record['name']} ({record['script']}) exited with status {record['exit_code']}")
        self.record = record


def summary_screen(doc: dict, report: Path) -> str:

    s = read_json(report.parent / "summary.json") or {}
    t, i, st = s.get("training") or {}, s.get("interpretation") or {}, s.get("steering") or {}
    lines = [
        "",
        "=" * 78,
        f"pipeline finished in {doc['seconds'] / 60:.1f} min "
        f"(peak RSS {max(x['peak_rss_mb'] for x in doc['stages']) / 1024:.1f} GB, stage "
        f"{max(doc['stages'], key=lambda x: x['peak_rss_mb'])['name']})",
    ]
    lines += [
        f"  {x['name']:<19} {x['seconds']:>7.1f} s  {x['peak_rss_mb']:>7.0f} MB  {'reused' if x['reused'] else ''}"
        for x in doc["stages"]
    ]
    if t:
        ce = (
            f", CE loss recovered {t['ce_loss_recovered']:.1%}, KL {t['kl']:.2f}"
            if t.get("ce_loss_recovered") is not None
            else ""
        )
        lines.append(f"SAE: val FVU {t['val_fvu']:.3f}, L0 {t['val_l0']:.0f}{ce}")
    if i:
        lines.append(
            f"interpretation: {i['explained']} latents explained ({', '.join(i['explainers'])}), mean detection score "
            f"{i['mean_score']:.3f}"
        )
    if st:

        def cell(m: str) -> str:
            return f"{m} {st[m]['harmonic'] or 0:.2f} ({st[m]['on_concept'] or 0:.0%} on-concept)"

        lines.append(
            "steering (held-out instructions; harmonic score 0-2, on-concept = concept score 2): "
            + ", ".join(cell(m) for m in ("sae", "diffmean", "prompt"))
            + f"; unsteered {st['unsteered']['on_concept'] or 0:.0%} on-concept"
        )
    lines += [
        f"report:          {report.resolve()}",
        f"feature browser: {(BROWSER_DIR / 'index.html').resolve()}",
        "steering page:   python llama_3_inference_text_completion_gradio.py   (then open http://127.0.0.1:7860)",
        "=" * 78,
    ]
    return "\n".join(lines)


def main(cfg: PipelineConfig) -> dict:
    plan = stages(cfg)
    names = [s.name for s in plan]
    if cfg.force_from is not None and cfg.force_from not in names:
        raise PipelineInputError(f"--force-from {cfg.force_from!r}: expected one of {', '.join(names)}")
    if cfg.claude and not os.environ.get("ANTHROPIC_API_KEY"):
        raise PipelineInputError("--claude needs ANTHROPIC_API_KEY in the environment")
    if cfg.report_only:
        report = write_report(RUNS_DIR)
        print(f"report: {report.resolve()}")
        return {"report": str(report)}
    first_forced = 0 if cfg.force else names.index(cfg.force_from) if cfg.force_from else len(plan)
    start = time.perf_counter()
    records = []
    try:
        for n, stage in enumerate(plan):
            records.append(run_stage(stage, force=n >= first_forced))
    except StageFailed as e:
        records.append(e.record)
        write_json_atomic(
            DEFAULT_LAYOUT.pipeline_record,
            make_manifest(
                "pipeline",
                config=vars(cfg),
                inputs={},
                counts={},
                stages=records,
                seconds=round(time.perf_counter() - start, 1),
                failed=e.record["name"],
            ),
        )
        raise PipelineInputError(f"{e} (its message is above); fix it and re-run: finished stages are reused") from None
    doc = make_manifest(
        "pipeline",
        config=vars(cfg),
        inputs={},
        counts={"stages": len(records)},
        stages=records,
        seconds=round(time.perf_counter() - start, 1),
        self_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        cpu=cpu_name(),  # the machine the figures belong to (scripts/demo_figures.py quotes it)
    )
    write_json_atomic(DEFAULT_LAYOUT.pipeline_record, doc)
    steering = STEERING_EVAL_DIR / RESULTS_NAME
    if (BROWSER_DIR / "index.html").is_file() and browser_stale(BROWSER_DIR / "index.html", steering):
        # the browser was written by the parse stage, before this run's steering evaluation it shows
        write_browser(open_top_sentences(TOP_SENTENCES_DIR), MEANINGS_DIR, BROWSER_DIR, ParseConfig.browser_sentences)
    report = write_report(RUNS_DIR)
    print(summary_screen(doc, report))
    return doc


if __name__ == "__main__":
    run_main(main, parse_config(PipelineConfig, sys.argv[1:], __doc__))
