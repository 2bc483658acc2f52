"""The demo run's figures, read from a finished run's folder, as the markdown block docs/results.md quotes.

Usage:
    python scripts/demo_figures.py                                  # print the block for ./runs
    python scripts/demo_figures.py --runs runs --write docs/results.md   # replace the block in the file
    python scripts/demo_figures.py --cpu "AMD EPYC (AVX-512 BF16), 2 cores" --write docs/results.md

Reads runs/pipeline.json (stage timings, peak memory), runs/sae/manifest.json (final validation, the
spliced evaluation), runs/top_sentences/manifest.json, runs/interpretation/explain/manifest.json and
runs/steering_eval/results.json, formats them as run_pipeline.py's summary screen does, and writes them
between the markers `<!-- demo-figures:begin -->` and `<!-- demo-figures:end -->`: nothing outside the
markers changes. The CPU is the one run_pipeline.py recorded in runs/pipeline.json (--cpu for a run made
before it recorded one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN = "<!-- demo-figures:begin -->"
END = "<!-- demo-figures:end -->"
METHODS = (("sae", "SAE latent (decoder row)"), ("diffmean", "DiffMean"), ("prompt", "prompting"))


def read(path: Path) -> dict | None:
    """A JSON object, or None when the file is absent (a stage the run did not reach)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: not a JSON object")
    return doc


def get(doc: dict | None, dotted: str):
    """doc["a"]["b"] for "a.b"; None where any part is missing."""
    for key in dotted.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def num(x, fmt: str = ",") -> str:
    return "—" if x is None else format(x, fmt)


def pct(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}%}"


def stage_note(name: str, runs: Path) -> str:
    """What the stage made, from its own manifest's counts (empty when the manifest is not there)."""
    if name == "sentences":
        c = get(read(runs / "sentences" / "manifest.json"), "counts") or {}
        return f"{num(c.get('documents'))} documents → {num(c.get('sentences'))} sentences" if c else ""
    if name == "capture":
        m = read(runs / "activations" / "manifest.json")
        c = get(m, "counts") or {}
        hooks = ", ".join(get(m, "hook_points") or [])
        return f"{num(c.get('sentences'))} sentences, {num(c.get('tokens'))} tokens of `{hooks}`" if c else ""
    if name == "preprocessing":
        c = get(read(runs / "preprocessed" / "manifest.json"), "counts") or {}
        if not c:
            return ""
        return f"{num(c.get('train_tokens'))} training / {num(c.get('val_tokens'))} validation tokens"
    if name == "training":
        m = read(runs / "sae" / "manifest.json")
        cfg = read(runs / "sae" / "sae" / "cfg.json") or {}
        steps = get(m, "counts.steps")
        if steps is None:
            return ""
        return f"{num(cfg.get('n_latents'))} latents, k {num(cfg.get('k'))}; {num(steps)} steps, spliced evaluation"
    if name == "top_sentences":
        c = get(read(runs / "top_sentences" / "manifest.json"), "counts") or {}
        return f"{num(c.get('sentences'))} sentences × {num(c.get('latents'))} latents" if c else ""
    if name == "interpret_send":
        m = read(runs / "interpretation" / "explain" / "manifest.json")
        return f"explainer: {m['explainer']}" if m and m.get("explainer") else ""
    if name == "interpret_parse":
        c = get(read(runs / "interpretation" / "explain" / "manifest.json"), "counts") or {}
        return f"{num(c.get('explained'))} meanings scored" if c else ""
    if name == "steering_eval":
        doc = read(runs / "steering_eval" / "results.json")
        return (
            f"{len(doc.get('latents', []))} latents × 3 methods × {len(doc.get('test', []))} instructions"
            if doc
            else ""
        )
    return ""


def block(runs: Path, cpu: str | None = None) -> str:
    """The markdown between the markers (markers included) for the run in `runs`."""
    pipeline = read(runs / "pipeline.json")
    if pipeline is None:
        raise SystemExit(f"{runs / 'pipeline.json'}: missing (run `python run_pipeline.py` first)")
    cpu = cpu or pipeline.get("cpu") or "an unrecorded CPU"
    stages = pipeline.get("stages") or []
    date = str(pipeline.get("created", ""))[:10] or "date not recorded"
    versions = pipeline.get("versions") or {}
    soft = ", ".join(f"{k} {versions[k]}" for k in ("torch", "python") if k in versions)
    lines = [
        BEGIN,
        "<!-- written by `python scripts/demo_figures.py --write docs/results.md` from a run's runs/ folder; "
        "do not edit by hand -->",
        "",
        f"One run of `python run_pipeline.py` on {cpu}, {date}" + (f" ({soft})" if soft else "") + ".",
    ]
    if stages:
        total = pipeline.get("seconds", sum(s.get("seconds", 0) for s in stages))
        peak = max(stages, key=lambda s: s.get("peak_rss_mb", 0))
        reused = [s["name"] for s in stages if s.get("reused")]
        lines += [
            f"Pipeline {total / 60:.1f} min, peak RSS {peak.get('peak_rss_mb', 0) / 1024:.1f} GB "
            f"(stage {peak.get('name')})" + (f"; reused: {', '.join(reused)}" if reused else "") + ".",
            "",
            "| stage | wall | peak RSS | what it did |",
            "|---|---|---|---|",
        ]
        for s in stages:
            lines.append(
                f"| {s.get('name')} | {s.get('seconds', 0):.1f} s | {s.get('peak_rss_mb', 0):,.0f} MB | "
                f"{stage_note(str(s.get('name')), runs)} |"
            )
    sae = read(runs / "sae" / "manifest.json") or read(runs / "sae" / "run.json")
    final, spliced = get(sae, "final_validation") or {}, get(sae, "spliced_evaluation") or {}
    headline = []
    if final:
        dead = final.get("val/dead_pct")
        headline.append(
            f"- SAE: validation FVU {num(final.get('val/fvu'), '.3f')}, L0 {num(final.get('val/l0'), '.0f')}"
            + (f", {dead:.1f}% of latents silent on the validation tokens" if dead is not None else "")
            + (f" ({final['val/tokens']:,})" if final.get("val/tokens") is not None else "")
        )
    if spliced.get("eval/ce_loss_recovered") is not None:
        ce = ""
        if spliced.get("eval/ce_clean") is not None and spliced.get("eval/ce_sae") is not None:
            ce = f" (CE {spliced['eval/ce_clean']:.2f} → {spliced['eval/ce_sae']:.2f} with the SAE"
            zero = spliced.get("eval/ce_zero_ablation")
            ce += f", {zero:.2f} zero-ablated)" if zero is not None else ")"
        n = spliced.get("eval/sentences")
        headline.append(
            f"- SAE spliced into the model: CE loss recovered {pct(spliced['eval/ce_loss_recovered'])}{ce}, "
            f"KL {num(spliced.get('eval/kl_sae'), '.2f')}" + (f" ({n} held-out sentences)" if n else "")
        )
    top = get(read(runs / "top_sentences" / "manifest.json"), "counts") or {}
    if top.get("latents") is not None and top.get("latents_never_firing") is not None:
        fire = top["latents"] - top["latents_never_firing"]
        headline.append(f"- Top sentences: {fire:,} of {top['latents']:,} latents fire on the corpus")
    interp = read(runs / "interpretation" / "explain" / "manifest.json")
    counts = get(interp, "counts") or {}
    if counts:
        auroc = counts.get("mean_detection_auroc_minilm")
        claude = counts.get("mean_detection_balanced_accuracy_claude")
        headline.append(
            f"- Interpretation ({get(interp, 'explainer') or 'explainer not recorded'}): "
            f"{num(counts.get('explained'))} latents explained, {num(counts.get('failures'))} parse failures, "
            f"mean detection AUROC {num(auroc, '.3f')} (MiniLM judge; 0.5 is chance)"
            + (
                f"; the independent e5 judge {e5:.3f} on a random {counts.get('e5_latents')} of them (MiniLM on "
                f"those: {num(counts.get('mean_minilm_on_e5_latents'), '.3f')})"
                if isinstance(e5 := counts.get("mean_detection_auroc_e5"), (int, float))
                else ""
            )
            + (f", Claude's balanced accuracy {claude:.3f}" if isinstance(claude, (int, float)) else "")
        )
    lines += ["", "Headline numbers:", "", *headline] if headline else []
    steering = get(read(runs / "steering_eval" / "results.json"), "summary") or {}
    if steering:
        lines += [
            "",
            "Steering evaluation (held-out instructions, each method at its best strength; the offline judge validated",
            "against hand ratings; on-concept = concept score 2, with its 95% interval over latents):",
            "",
            "| method | rows | on-concept | concept ≥ 1 | instruction | fluency | harmonic |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, label in [*METHODS, ("unsteered", "unsteered")]:
            m = steering.get(key) or {}
            low, high = m.get("on_concept_ci") or (None, None)
            interval = f"[{pct(low, 0)}–{pct(high, 0)}]"
            lines.append(
                f"| {label} | {num(m.get('rows'))} | {pct(m.get('on_concept'), 0)} {interval} | "
                f"{pct(m.get('concept_any'), 0)} | {num(m.get('instruction'), '.2f')} | "
                f"{num(m.get('fluency'), '.2f')} | {'—' if key == 'unsteered' else num(m.get('harmonic'), '.2f')} |"
            )
    lines += steering_examples(read(runs / "steering_eval" / "results.json"))
    lines += ["", END]
    return "\n".join(lines)


def steering_examples(doc: dict | None, n: int = 3) -> list[str]:
    """The n latents whose SAE steering was most on-concept, one held-out instruction each (the first where the
    SAE row scored highest on concept): every method's text beside the unsteered one, with the judge's scores."""
    if not doc or not doc.get("rows"):
        return []

    def sae_test(r: dict) -> dict:
        return r["methods"]["sae"]["test"]

    best = sorted(doc["latents"], key=lambda r: (-(sae_test(r)["on_concept"] or 0), -(sae_test(r)["harmonic"] or 0)))
    lines = [
        "",
        f"Examples: the {n} latents SAE steering moved most on-concept, on one held-out instruction each (greedy, "
        "32 tokens; scores concept / instruction / fluency):",
        "",
        "| latent: concept | instruction | unsteered | SAE latent | DiffMean | prompting |",
        "|---|---|---|---|---|---|",
    ]
    for entry in best[:n]:
        lat = entry["latent"]
        rows = [r for r in doc["rows"] if r["latent"] == lat and r["phase"] == "test"]
        sae = max((r for r in rows if r["method"] == "sae"), key=lambda r: (r["concept"], r["harmonic"]))
        same = {r["method"]: r for r in rows if r["prompt"] == sae["prompt"]}

        def cell(r: dict | None) -> str:
            if r is None:
                return ""
            text = r["text"].replace("|", "\\|").replace("\n", " ")
            strength = f" (× {r['factor']})" if r.get("factor") else ""
            return f"{text}{strength} **{r['concept']}/{r['instruction']}/{r['fluency']}**"

        lines.append(
            f"| {lat}: {entry['concept']} | {doc['instructions'][sae['prompt']]} | {cell(same.get('none'))} | "
            f"{cell(sae)} | {cell(same.get('diffmean'))} | {cell(same.get('prompt'))} |"
        )
    return lines


COMPARE_BEGIN = "<!-- stage-times:begin -->"
COMPARE_END = "<!-- stage-times:end -->"


def compare_block(runs: list[tuple[str, Path]]) -> str:
    """The markdown between the stage-times markers: each run's stage times and headline numbers side by side,
    from the same files as the demo block (a run folder needs only pipeline.json, sae/manifest.json,
    interpretation/explain/manifest.json and steering_eval/results.json)."""
    docs = [(label, path, read(path / "pipeline.json")) for label, path in runs]
    for label, path, doc in docs:
        if doc is None:
            raise SystemExit(f"{path / 'pipeline.json'}: missing ({label})")
    names = list(dict.fromkeys(s["name"] for _, _, doc in docs for s in doc.get("stages", [])))
    lines = [
        COMPARE_BEGIN,
        "<!-- written by `python scripts/demo_figures.py --compare LABEL=RUNS ... --write docs/results.md`; do not "
        "edit -->",
        "",
        *[
            f"- **{label}**: `python run_pipeline.py` on {doc.get('cpu', 'an unrecorded CPU')}, "
            f"{str(doc.get('created', ''))[:10]}, hook point {hook_of(path)}"
            for label, path, doc in docs
        ],
        "",
        "| stage | " + " | ".join(label for label, _, _ in docs) + " |",
        "|---|" + "---|" * len(docs),
    ]
    for name in names:
        cells = []
        for _, _, doc in docs:
            s = next((s for s in doc.get("stages", []) if s["name"] == name), None)
            cells.append("—" if s is None else f"{s['seconds']:.1f} s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **pipeline** | " + " | ".join(f"**{doc['seconds'] / 60:.1f} min**" for _, _, doc in docs) + " |")
    rows = {
        "validation FVU": lambda p: num(get(sae_doc(p), "final_validation.val/fvu"), ".3f"),
        "dead latents (never fire on the held-out tokens)": lambda p: pct_of(
            get(sae_doc(p), "final_validation.val/dead_pct")
        ),
        "CE loss recovered": lambda p: pct(get(sae_doc(p), "spliced_evaluation.eval/ce_loss_recovered")),
        "KL": lambda p: num(get(sae_doc(p), "spliced_evaluation.eval/kl_sae"), ".3f"),
        "detection AUROC (MiniLM)": lambda p: num(
            get(read(p / "interpretation" / "explain" / "manifest.json"), "counts.mean_detection_auroc_minilm"), ".3f"
        ),
    }
    for key, label in METHODS:
        rows[f"steering on-concept: {label}"] = lambda p, key=key: on_concept(p, key)
    for label, fn in rows.items():
        lines.append(f"| {label} | " + " | ".join(fn(path) for _, path, _ in docs) + " |")
    lines += ["", COMPARE_END]
    return "\n".join(lines)


def sae_doc(runs: Path) -> dict | None:
    return read(runs / "sae" / "manifest.json") or read(runs / "sae" / "run.json")


def hook_of(runs: Path) -> str:
    sae = sae_doc(runs)
    return f"`{get(sae, 'sae.hook_point') or '?'}`"


def pct_of(x) -> str:
    return "—" if x is None else f"{x:.1f}%"


def on_concept(runs: Path, method: str) -> str:
    m = get(read(runs / "steering_eval" / "results.json"), f"summary.{method}") or {}
    low, high = m.get("on_concept_ci") or (None, None)
    return f"{pct(m.get('on_concept'), 0)} [{pct(low, 0)}–{pct(high, 0)}]" if m else "—"


VARIANTS_BEGIN = "<!-- steering-variants:begin -->"
VARIANTS_END = "<!-- steering-variants:end -->"


def variants_block(bench_json: Path) -> str | None:
    """The markdown between the steering-variants markers from bench/results/steering.json (None: not run)."""
    doc = read(bench_json)
    if not doc or not doc.get("rows"):
        return None

    def cell(m: dict) -> str:
        low, high = m["on_concept_ci"]
        return (
            f"{pct(m['on_concept'], 0)} [{pct(low, 0)}–{pct(high, 0)}] / {pct(m['concept_any'], 0)} / "
            f"{m['harmonic']:.2f} / {m['fluency']:.2f}"
        )

    lines = [
        VARIANTS_BEGIN,
        "<!-- written by `python scripts/demo_figures.py --write docs/results.md` from bench/results/steering.json; "
        "do not edit -->",
        "",
        f"`python bench/bench_steering.py`, one run per row on the {doc.get('cpu', 'unrecorded CPU')}; each cell: "
        "on-concept (concept 2) [95% interval over latents] / concept ≥ 1 / harmonic / fluency, held-out rows:",
        "",
        "| SAE | variant | latents | SAE latent | DiffMean | prompting | unsteered on-concept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        s = r["summary"]
        lines.append(
            f"| {r['hook_point']} | {r['variant']} {' '.join(r['flags'])} | {r['latents']} | {cell(s['sae'])} | "
            f"{cell(s['diffmean'])} | {cell(s['prompt'])} | {pct(s['unsteered']['on_concept'], 0)} |"
        )
    lines += ["", VARIANTS_END]
    return "\n".join(lines)


def replace_block(text: str, new_block: str) -> str:
    """`text` with the part from BEGIN to END (markers included) replaced by `new_block`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"no {BEGIN} ... {END} markers to replace")
    return text[:start] + new_block + text[end + len(END) :]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="a finished run's folder (default: runs)")
    parser.add_argument("--write", nargs="*", default=None, help="files whose marked block to replace")
    parser.add_argument("--cpu", default=None, help="the CPU that ran it (default: runs/pipeline.json's)")
    parser.add_argument(
        "--compare", nargs="*", default=[], help="LABEL=RUNS_DIR ...: stage times side by side (the stage-times block)"
    )
    args = parser.parse_args(argv)
    compared = None
    if args.compare:
        pairs = [item.split("=", 1) for item in args.compare]
        if any(len(p) != 2 for p in pairs):
            raise SystemExit("--compare: each item is LABEL=RUNS_DIR")
        compared = compare_block([(label, Path(path)) for label, path in pairs])
    new = block(Path(args.runs), args.cpu)
    if args.write is None:
        print(new if compared is None else compared)
    variants = variants_block(Path(__file__).resolve().parents[1] / "bench" / "results" / "steering.json")
    for name in args.write or []:
        path = Path(name)
        text = replace_block(path.read_text(), new)
        if variants and VARIANTS_BEGIN in text:
            start, end = text.index(VARIANTS_BEGIN), text.index(VARIANTS_END) + len(VARIANTS_END)
            text = text[:start] + variants + text[end:]
        if compared and COMPARE_BEGIN in text:
            start, end = text.index(COMPARE_BEGIN), text.index(COMPARE_END) + len(COMPARE_END)
            text = text[:start] + compared + text[end:]
        path.write_text(text)
        print(f"{path}: demo figures from {args.runs}")
    return new


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
