"""What makes SAE steering work? The steering evaluation's variants, each against DiffMean and prompting in the
same run, judged by the validated offline judge (tests/data/steering_ratings).

    python bench/bench_steering.py                                   # the demo SAE (runs/), every variant
    python bench/bench_steering.py --variants base clamp --work /tmp/steer
    python bench/bench_steering.py --sae /tmp/l15/runs/sae/sae --top-sentences /tmp/l15/runs/top_sentences \
        --meanings /tmp/l15/latent_index_meaning --label resid_pre.15          # another SAE (e.g. bench_layers')

Each variant is one steering_evaluation.py run (its own folder under --work; a finished one is reused) with the
flags below on top of the main command's defaults. Reported per variant and method, over the held-out rows:
on-concept share (concept 2) with its 95% interval over latents, concept >= 1, mean instruction and fluency,
harmonic score, seconds. Writes bench/results/steering.json (one entry per --label, kept across runs) and
prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_3.cpu_features import cpu_name  # noqa: E402

VARIANTS = {
    "base": [],
    "strong": ["--factors", "0.2", "0.4", "0.8"],
    "clamp": ["--sae-mode", "clamp"],
    "no-error": ["--no-keep-error"],
    "generated-only": ["--steer-on", "generated"],
}


def run_variant(name: str, work: Path, inputs: list[str]) -> dict:
    out = work / name
    argv = [sys.executable, str(REPO / "steering_evaluation.py"), *inputs, *VARIANTS[name], "--out", str(out)]
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(
            f"variant {name}: steering_evaluation.py failed (exit {proc.returncode}); see {work}/{name}.log"
        )
    doc = json.loads((out / "results.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    keep = ("rows", "on_concept", "on_concept_ci", "concept_any", "instruction", "fluency", "harmonic")
    return {
        "variant": name,
        "flags": VARIANTS[name],
        "hook_point": doc["hook_point"],
        "latents": len(doc["latents"]),
        "seconds": manifest["counts"]["seconds"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "summary": {m: {k: doc["summary"][m].get(k) for k in keep} for m in ("sae", "diffmean", "prompt", "unsteered")},
    }


def table(rows: list[dict]) -> str:
    def cell(s: dict) -> str:
        low, high = s["on_concept_ci"]
        return (
            f"{s['on_concept']:.0%} [{low:.0%}–{high:.0%}] / {s['concept_any']:.0%} / "
            f"{s['instruction']:.2f} / {s['fluency']:.2f} / {s['harmonic']:.2f}"
        )

    lines = [
        "| SAE | variant | SAE latent | DiffMean | prompting | unsteered on-concept | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"| {r['label']} | {r['variant']} | {cell(s['sae'])} | {cell(s['diffmean'])} | {cell(s['prompt'])} | "
            f"{s['unsteered']['on_concept']:.0%} | {r['seconds']:.0f} |"
        )
    return (
        "each method: on-concept (concept 2) [95% interval over latents] / concept >= 1 / instruction / fluency / "
        "harmonic, on the held-out instructions\n" + "\n".join(lines)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_steering"))
    ap.add_argument("--label", default="demo", help="the name this SAE's rows get in steering.json")
    ap.add_argument("--sae"), ap.add_argument("--top-sentences"), ap.add_argument("--meanings")
    args = ap.parse_args()
    inputs = [
        f
        for flag, v in (("--sae", args.sae), ("--top-sentences", args.top_sentences), ("--meanings", args.meanings))
        if v
        for f in (flag, v)
    ]
    work = Path(args.work) / args.label
    work.mkdir(parents=True, exist_ok=True)
    out = REPO / "bench" / "results" / "steering.json"
    out.parent.mkdir(exist_ok=True)
    doc = json.loads(out.read_text()) if out.exists() else {"cpu": cpu_name(), "rows": []}
    for name in args.variants:
        row = {"label": args.label, **run_variant(name, work, inputs)}
        doc["rows"] = [r for r in doc["rows"] if (r["label"], r["variant"]) != (args.label, name)] + [row]
        out.write_text(json.dumps(doc, indent=1))
        print(f"{args.label} {name}: {json.dumps(row['summary']['sae'])}", flush=True)
    doc["cpu"] = cpu_name()
    out.write_text(json.dumps(doc, indent=1))
    print(f"\n{doc['cpu']}\n" + table(doc["rows"]))


if __name__ == "__main__":
    main()
