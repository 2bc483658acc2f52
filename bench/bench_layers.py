"""Which hook layer? The whole pipeline at a few depths of the embedded model, on a small budget.

    python bench/bench_layers.py                                  # resid_pre at 10, 15, 20, 25 of 30 layers
    python bench/bench_layers.py --layers 15 25 --max-sentences 2048 --work /tmp/layers
    python bench/bench_layers.py --layers 15 25 --work /tmp/layers --collect   # only read the finished runs

Per layer, run_pipeline.py runs every stage (the README's main command) in its own working folder
with the capture at resid_pre.<layer>; the sentence dataset is built once and copied. Reported per
layer, from its stages' outputs (the SAE run's manifest, the parse stage's manifest, the steering results):
validation FVU, dead latents, CE loss recovered and KL of the spliced SAE, the offline explanations' mean
detection AUROC, the capture's tokens/s, and the steering evaluation's headline (harmonic score on held-out
instructions, on-concept share with its interval, fluency loss ratio) for SAE latents, DiffMean and prompting.
Writes bench/results/layers.json and prints the table docs/results.md quotes.

Run again with the same --work, each layer's finished stages are reused (their fingerprints match), so
a changed steering evaluation re-runs alone; "minutes" is always this run's wall time per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_3.cpu_features import cpu_name


def run_layer(work: Path, layer: int, max_sentences: int, sentences_from: Path | None, extra: list[str]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    if sentences_from is not None and not (work / "runs" / "sentences").exists():
        shutil.copytree(sentences_from, work / "runs" / "sentences")
    argv = [
        sys.executable,
        str(REPO / "run_pipeline.py"),
        "--max-sentences",
        str(max_sentences),
        "--stage-args",
        f"capture:--hook-points=resid_pre.{layer}",
        *extra,  # more STAGE:--flag items
    ]
    t0 = time.perf_counter()
    with open(work / "pipeline.log", "w") as log:
        proc = subprocess.run(argv, cwd=work, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"layer {layer}: run_pipeline.py failed (exit {proc.returncode}); see {work / 'pipeline.log'}")
    return collect(work, layer) | {"minutes": round((time.perf_counter() - t0) / 60, 1)}


def collect(work: Path, layer: int) -> dict:
    """A finished layer's numbers, from its stages' own outputs: the SAE run's manifest, the parse stage's
    manifest (mean detection AUROC over the scored latents) and the steering evaluation's summary."""
    runs = work / "runs"
    sae = json.loads((runs / "sae" / "manifest.json").read_text())
    final, spliced = sae["final_validation"], sae["spliced_evaluation"]
    parse = json.loads((runs / "interpretation" / "explain" / "manifest.json").read_text())["counts"]
    steering = json.loads((runs / "steering_eval" / "results.json").read_text())["summary"]
    capture = json.loads((runs / "activations" / "manifest.json").read_text())
    return {
        "layer": layer,
        "hook_point": f"resid_pre.{layer}",
        "capture_tokens_per_s": capture.get("throughput", {}).get("tokens_per_s"),
        "val_fvu": final["val/fvu"],
        "val_dead_pct": final.get("val/dead_pct"),
        "ce_loss_recovered": spliced.get("eval/ce_loss_recovered"),
        "kl": spliced.get("eval/kl_sae"),
        "detection": parse["mean_detection_auroc_minilm"],
        "steering": {m: steering[m] for m in ("sae", "diffmean", "prompt", "unsteered")},
    }


def table(rows: list[dict]) -> str:
    head = (
        "| hook | FVU | CE recovered | KL | detection | SAE harmonic / on-concept / loss× | "
        "DiffMean harmonic / on-concept / loss× | prompting harmonic / on-concept | unsteered on-concept |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )

    def cell(c: dict, ratio: bool = True) -> str:
        """harmonic / on-concept [95% interval over latents] / fluency loss ratio."""
        low, high = c.get("on_concept_ci") or (0, 0)
        parts = [f"{c['harmonic'] or 0:.2f}", f"{c['on_concept'] or 0:.0%} [{low or 0:.0%}–{high or 0:.0%}]"]
        return " / ".join(parts + ([f"{c['loss_ratio'] or 0:.1f}×"] if ratio else []))

    lines = [head]
    for r in rows:
        s = r["steering"]
        lines.append(
            f"| {r['hook_point']} | {r['val_fvu']:.3f} | {r['ce_loss_recovered']:.1%} | {r['kl']:.2f} | "
            f"{r['detection']:.3f} | {cell(s['sae'])} | {cell(s['diffmean'])} | {cell(s['prompt'], False)} | "
            f"{s['unsteered']['on_concept'] or 0:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 15, 20, 25])
    ap.add_argument("--max-sentences", type=int, default=4096)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_layers"))
    ap.add_argument("--sentences", help="a sentence dataset to copy into every layer's run (default: build it once)")
    ap.add_argument("--stage-args", nargs="*", default=[], help="more run_pipeline.py --stage-args for every layer")
    ap.add_argument("--collect", action="store_true", help="only read the layers' finished runs in --work")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    sentences = Path(args.sentences) if args.sentences else None
    for layer in args.layers:
        if args.collect:
            rows.append(collect(work / f"resid_pre.{layer}", layer))
            continue
        row = run_layer(work / f"resid_pre.{layer}", layer, args.max_sentences, sentences, args.stage_args)
        sentences = sentences or work / f"resid_pre.{layer}" / "runs" / "sentences"
        rows.append(row)
        print(f"resid_pre.{layer}: {json.dumps(row)}", flush=True)
    out = REPO / "bench" / "results" / "layers.json"
    out.parent.mkdir(exist_ok=True)
    doc = {"cpu": cpu_name(), "max_sentences": args.max_sentences, "layers": rows}
    out.write_text(json.dumps(doc, indent=1))
    print(f"\n{doc['cpu']}, {args.max_sentences} sentences per layer\n" + table(rows))


if __name__ == "__main__":
    main()
