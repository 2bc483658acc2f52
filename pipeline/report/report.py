"""The run report: one HTML page with PNG plots, built from the files the stages wrote.

Every number comes from a stage's own output (metrics.jsonl, manifests, parquet, meaning files,
steering results), so the report can be rebuilt at any time and never disagrees with the run.
A stage that has not run yet is listed as missing instead of failing the report.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from llama_3.errors import PipelineInputError  # noqa: E402
from pipeline.core.layout import MEANINGS_DIR, RUNS_DIR, RunLayout  # noqa: E402
from pipeline.core.manifest import read_jsonl, write_json_atomic  # noqa: E402
from pipeline.interpret.meanings import load_meanings  # noqa: E402
from pipeline.report.steering_tables import latent_table, summary_table  # noqa: E402
from pipeline.sae.formats import sae_sha256, sae_weights_file  # noqa: E402
from pipeline.sae.training_run import METRICS_NAME, TrainingRun  # noqa: E402
from pipeline.steering.results import SteeringEvalOutput  # noqa: E402


@dataclass
class Report:
    summary: dict = field(default_factory=dict)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    missing: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # HTML, after the plots


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.zeros(0), np.zeros(0))


def save(fig, report: Report, out: Path, name: str, caption: str) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    report.plots.append((name, caption))


def training_plots(paths: RunLayout, report: Report, out: Path) -> None:
    rows = read_jsonl(paths.sae_run / METRICS_NAME)
    try:
        run = TrainingRun.open(paths.sae_run)
    except PipelineInputError:
        run = None
    if not rows or run is None:
        report.missing.append("SAE training (runs/sae)")
        return
    step, loss = series(rows, "train/loss")
    vstep, vloss = series(rows, "val/loss")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(step, loss, lw=0.8, label="train loss (MSE / input variance)")
    ax.plot(vstep, vloss, "o-", label="validation loss")
    ax.set_xlabel("step"), ax.set_ylabel("normalised MSE"), ax.set_yscale("log"), ax.legend()
    save(fig, report, out, "loss.png", f"Training and validation loss. {sink_note(paths)}")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    dstep, silent = series(rows, "debug/dead_latents_ratio")
    astep, aux = series(rows, "train/aux_loss")
    window = run.manifest.get("config", {}).get("dead_tokens")
    ax.plot(dstep, 100 * silent, color="C3")
    ax.set_xlabel("step"), ax.set_ylabel(f"silent for the last {window:,} tokens (%)", color="C3")
    ax2 = ax.twinx()
    ax2.plot(astep, aux, color="C2", lw=0.8)
    ax2.set_ylabel("aux-k loss", color="C2")
    save(
        fig,
        report,
        out,
        "aux_k.png",
        f"The latents aux-k works on: silent for the last {window:,} training tokens (--dead-tokens), and the aux-k "
        "loss that revives them. Not the dead latents of the table, which never fire on the held-out tokens.",
    )

    fstep, fvu = series(rows, "val/fvu")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(fstep, fvu, "s-", color="C1")
    ax.set_xlabel("step"), ax.set_ylabel("validation FVU")
    save(
        fig,
        report,
        out,
        "fvu.png",
        "Fraction of variance unexplained on the held-out tokens (L0 is k at every step: TopK)",
    )

    spliced, final = run.spliced_evaluation, run.final_validation
    report.summary["training"] = {
        "steps": run.steps,
        "val_fvu": final.get("val/fvu"),
        "val_l0": final.get("val/l0"),
        "val_dead_pct": final.get("val/dead_pct"),
        "val_tokens": final.get("val/tokens"),
        "tokens_per_s": run.manifest.get("throughput", {}).get("tokens_per_s"),
        "ce_loss_recovered": spliced.get("eval/ce_loss_recovered"),
        "kl": spliced.get("eval/kl_sae"),
    }
    if "eval/ce_clean" in spliced:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = ["clean model", "SAE spliced in", "zero-ablated"]
        values = [spliced["eval/ce_clean"], spliced["eval/ce_sae"], spliced["eval/ce_zero_ablation"]]
        ax.barh(labels, values, color=["C0", "C1", "C7"])
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center")
        ax.set_xlabel("next-token cross-entropy (nats)")
        ax.set_title(
            f"CE loss recovered {spliced['eval/ce_loss_recovered']:.1%}, KL {spliced['eval/kl_sae']:.2f} "
            f"({spliced['eval/sentences']} held-out sentences)",
            fontsize=9,
        )
        ax.set_xlim(0, max(values) * 1.2)
        save(
            fig,
            report,
            out,
            "ce_recovered.png",
            "Cross-entropy with the SAE spliced in versus the clean and zero-ablated model",
        )


def sink_note(paths: RunLayout) -> str:
    """What the training data left out (the preprocessing manifest), said beside the loss plot."""
    policy = (read_json(paths.preprocessed / "manifest.json") or {}).get("massive_activation_policy", {})
    sinks = policy.get("sink_tokens")
    if sinks is None:
        return ""
    if not sinks:
        return "No massive activations were left out of the data (--sink-norm-ratio)."
    return (
        f"{sinks} massive-activation tokens (norm above {policy['sink_norm']:.0f}, 10x the median; attention sinks "
        "past the first position) were left out of the data and pass through the SAE unchanged; each one alone "
        "dominated its batch's loss, the spikes of runs that kept them."
    )


def density_plot(paths: RunLayout, report: Report, out: Path) -> None:
    stats = paths.top_sentences / "latent_stats.parquet"
    if not stats.is_file():
        report.missing.append("top sentences (runs/top_sentences)")
        return
    freq = np.asarray(pq.read_table(stats, columns=["frequency"]).column("frequency").to_numpy(), dtype=float)
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if len(alive):
        ax.hist(np.log10(alive), bins=50, color="C0")
    ax.set_xlabel("log10(firing frequency per token)"), ax.set_ylabel("latents")
    ax.set_title(f"{len(alive)} of {len(freq)} latents fire on the corpus ({len(freq) - len(alive)} never)", fontsize=9)
    save(fig, report, out, "density.png", "Latent density: how often each latent fires (the feature-browser corpus)")
    report.summary["latents"] = {
        "total": len(freq),
        "firing": int(len(alive)),
        "median_frequency": float(np.median(alive)) if len(alive) else None,
    }


def detection_plot(paths: RunLayout, report: Report, out: Path) -> None:
    sae_file = sae_weights_file(paths.sae)
    if not sae_file.is_file():
        return
    meanings = load_meanings(paths.meanings, sae_sha256(paths.sae))
    # NaN: a latent with no held-out sentence of one kind, unscored (the parse stage's mean leaves it out too)
    scores = [
        m["score"] for m in meanings.values() if isinstance(m.get("score"), (int, float)) and math.isfinite(m["score"])
    ]
    if not scores:
        report.missing.append("interpretation scores (latent_index_meaning/)")
        return
    explainers = sorted({str(m.get("explainer")) for m in meanings.values()})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(scores, bins=40, range=(0, 1), color="C4")
    ax.axvline(0.5, color="k", ls=":", lw=1)
    ax.set_xlabel("detection score (AUROC / balanced accuracy; 0.5 = chance)"), ax.set_ylabel("latents")
    ax.set_title(f"{len(scores)} explained latents, mean {np.mean(scores):.3f} ({', '.join(explainers)})", fontsize=9)
    save(fig, report, out, "detection.png", "How well each latent's explanation predicts where it fires")
    report.summary["interpretation"] = {
        "explained": len(meanings),
        "scored": len(scores),
        "mean_score": float(np.mean(scores)),
        "explainers": explainers,
    }


def steering_plot(paths: RunLayout, report: Report, out: Path) -> None:
    try:
        done = SteeringEvalOutput.open(paths.steering_eval)
    except PipelineInputError:
        report.missing.append(f"steering evaluation ({paths.steering_eval})")
        return
    summary = done.summary
    methods = ["sae", "diffmean", "prompt"]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, key, label in zip(
        axes,
        ("harmonic", "on_concept", "fluency"),
        ("harmonic score (0-2)", "on-concept (concept 2)", "fluency score (0-2)"),
    ):
        names = methods + (["unsteered"] if key != "harmonic" else [])
        ax.bar(names, [summary[m].get(key) or 0 for m in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30)
    save(
        fig,
        report,
        out,
        "steering.png",
        f"Steering evaluation on held-out instructions: means over the {len(done.latents)} latents with the best "
        f"output score at {done.hook_point}",
    )
    report.summary["steering"] = {m: summary[m] for m in ("sae", "diffmean", "prompt", "unsteered") if m in summary}
    tables = "".join(
        f"<details><summary>latent {r['latent']}: {html.escape(r['concept'])} — SAE on-concept "
        f"{r['methods']['sae']['test']['on_concept'] or 0:.0%}, DiffMean "
        f"{r['methods']['diffmean']['test']['on_concept'] or 0:.0%}, prompting "
        f"{r['methods']['prompt']['test']['on_concept'] or 0:.0%}</summary>{latent_table(done, r['latent'])}</details>"
        for r in done.latents
    )
    report.sections.append(
        f"<h2>Steering</h2><p>Held-out instructions at {html.escape(done.hook_point)}; every continuation is in "
        f"{html.escape(str(done.directory / 'results.json'))}.</p>{summary_table(done)}<h3>Each latent</h3>{tables}"
    )


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def headline_table(summary: dict) -> str:
    """The numbers a reader comes for, each with what it measures."""
    rows = []
    t = summary.get("training")
    if t:
        rows += [
            (
                "FVU",
                _fmt(t["val_fvu"], ".3f"),
                f"variance left unexplained on {t['val_tokens'] or 0:,} held-out tokens",
            ),
            ("L0", _fmt(t["val_l0"], ".1f"), "latents active per token (k, by construction of TopK)"),
            ("dead latents", _fmt(t["val_dead_pct"], ".1f") + "%", "never fire on those held-out tokens"),
            ("CE loss recovered", _fmt(t["ce_loss_recovered"], ".1%"), "SAE spliced in: 100% = clean, 0% = zeroed"),
            ("KL", _fmt(t["kl"], ".3f"), "KL(clean ‖ spliced) per token"),
        ]
    i = summary.get("interpretation")
    if i:
        rows.append(
            ("detection", _fmt(i["mean_score"], ".3f"), f"mean over {i['scored']:,} explained latents (0.5 = chance)")
        )
    s = summary.get("steering")
    if s:
        for method, label in (("sae", "SAE latent"), ("diffmean", "DiffMean"), ("prompt", "prompting")):
            if method in s:
                m = s[method]
                ci = m.get("on_concept_ci") or [None, None]
                rows.append(
                    (
                        f"steering: {label}",
                        f"{_fmt(m.get('on_concept'), '.0%')} [{_fmt(ci[0], '.0%')}–{_fmt(ci[1], '.0%')}]",
                        f"on-concept (judge's concept score 2) on held-out instructions; harmonic "
                        f"{_fmt(m.get('harmonic'), '.2f')}, fluency {_fmt(m.get('fluency'), '.2f')}",
                    )
                )
    body = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td style='text-align:left'>{html.escape(c)}</td></tr>"
        for a, b, c in rows
    )
    return f"<table><tr><th>measure</th><th>value</th><th>what it is</th></tr>{body}</table>"


def stage_table(pipeline_doc: dict | None) -> str:
    if not pipeline_doc:
        return "<p>No stage timings (the stages were run one by one, not through run_pipeline.py).</p>"
    rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{s['seconds']:.1f}</td><td>{s['peak_rss_mb']:.0f}</td>"
        f"<td>{'reused' if s.get('reused') else 'computed'}</td></tr>"
        for s in pipeline_doc["stages"]
    )
    peak = max(s["peak_rss_mb"] for s in pipeline_doc["stages"])
    return (
        "<table><tr><th>stage</th><th>wall s</th><th>peak RSS MB</th><th></th></tr>"
        + rows
        + f"<tr><th>total</th><th>{pipeline_doc['seconds']:.1f}</th><th>{peak:.0f}</th><th></th></tr></table>"
    )


def write_report(runs: str | Path = RUNS_DIR, meanings: str | Path = MEANINGS_DIR) -> Path:
    """Build runs/report/index.html (+ PNGs, summary.json) from whatever the stages have written."""
    paths = RunLayout(Path(runs), Path(meanings))
    out = paths.report
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    training_plots(paths, report, out)
    density_plot(paths, report, out)
    detection_plot(paths, report, out)
    steering_plot(paths, report, out)
    pipeline_doc = read_json(paths.pipeline_record)
    report.summary["stages"] = pipeline_doc["stages"] if pipeline_doc else None
    write_json_atomic(out / "summary.json", report.summary)
    figures = "".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(cap)}">'
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for name, cap in report.plots
    )
    missing = "".join(f"<li>{html.escape(m)}: not run yet</li>" for m in report.missing)
    numbers = html.escape(json.dumps({k: v for k, v in report.summary.items() if k != "stages"}, indent=2, default=str))
    browser = paths.browser / "index.html"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SAE pipeline report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
figure{{display:inline-block;margin:0.5em;vertical-align:top}} img{{max-width:520px;border:1px solid #ddd}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
pre{{background:#f6f6f6;padding:1em}}</style>
</head><body><h1>SAE pipeline report</h1>
<p>Feature browser: <a href="{html.escape(_relative(browser, out))}">{html.escape(str(browser))}</a> ·
steering page: <code>python llama_3_inference_text_completion_gradio.py</code> → http://127.0.0.1:7860</p>
<h2>Headline</h2>{headline_table(report.summary)}
<h2>Stages</h2>{stage_table(pipeline_doc)}
{"<ul>" + missing + "</ul>" if missing else ""}
<h2>Plots</h2>{figures}
{"".join(report.sections)}
<details><summary>Every number (summary.json)</summary><pre>{numbers}</pre></details></body></html>"""
    (out / "index.html").write_text(page)
    return out / "index.html"


def _relative(target: Path, base: Path) -> str:
    return os.path.relpath(target, base)
