"""The documentation: the README's length, every relative link in the README and docs/, and the demo figures
script (scripts/demo_figures.py) on a synthetic run folder."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def load_demo_figures():
    spec = importlib.util.spec_from_file_location("demo_figures", REPO / "scripts" / "demo_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_at_most_250_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code blocks hold no links
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same file
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(REPO)}: links to missing files {missing}"


def write_run(runs: Path) -> None:
    """The files and keys scripts/demo_figures.py reads, as a finished run writes them."""

    def put(rel: str, doc: dict) -> None:
        (runs / rel).parent.mkdir(parents=True, exist_ok=True)
        (runs / rel).write_text(json.dumps(doc))

    put(
        "pipeline.json",
        {
            "kind": "pipeline",
            "created": "2030-01-02T03:04:05+00:00",
            "versions": {"python": "3.12.1", "torch": "9.9.9"},
            "seconds": 123.4,
            "stages": [
                {"name": "sentences", "seconds": 11.1, "peak_rss_mb": 400.0, "reused": False},
                {"name": "training", "seconds": 47.9, "peak_rss_mb": 3278.0, "reused": False},
                {"name": "steering_eval", "seconds": 64.4, "peak_rss_mb": 1480.0, "reused": True},
            ],
        },
    )
    put("sentences/manifest.json", {"counts": {"documents": 10033, "sentences": 36341}})
    put(
        "sae/manifest.json",
        {
            "counts": {"steps": 202},
            "final_validation": {"val/fvu": 0.1234, "val/l0": 32.0, "val/dead_pct": 15.25},
            "spliced_evaluation": {
                "eval/ce_clean": 3.59,
                "eval/ce_sae": 4.18,
                "eval/ce_zero_ablation": 13.37,
                "eval/ce_loss_recovered": 0.9401,
                "eval/kl_sae": 0.7034,
                "eval/sentences": 128,
            },
        },
    )
    put("sae/sae/cfg.json", {"n_latents": 4608, "k": 32})
    put("top_sentences/manifest.json", {"counts": {"sentences": 8192, "latents": 4608, "latents_never_firing": 19}})
    put(
        "interpretation/explain/manifest.json",
        {
            "explainer": "offline-concept",
            "counts": {"explained": 4341, "failures": 0, "mean_detection_auroc_minilm": 0.6723},
        },
    )
    method = {"rows": 20, "harmonic": 0.47, "on_concept": 0.38, "on_concept_ci": [0.2, 0.55], "concept_any": 0.5}
    method |= {"concept": 0.4, "instruction": 1.92, "fluency": 1.77}

    def row(latent, method, text, concept, factor=None):
        return {"latent": latent, "method": method, "phase": "test", "prompt": 0, "text": text, "factor": factor} | {
            "concept": concept,
            "instruction": 2,
            "fluency": 2,
            "harmonic": 2.0 if concept else 0.0,
        }

    put(
        "steering_eval/results.json",
        {
            "instructions": ["Describe a walk."],
            "test": [0],
            "latents": [
                {
                    "latent": 311,
                    "concept": "dog, breed",
                    "methods": {"sae": {"test": {"on_concept": 0.5, "harmonic": 1}}},
                },
                {"latent": 1472, "concept": "film", "methods": {"sae": {"test": {"on_concept": 0.0, "harmonic": 0}}}},
            ],
            "rows": [
                row(311, "none", "A walk is nice.", 0),
                row(311, "sae", "A walk with a dog | a breed.", 2, 0.4),
                row(311, "diffmean", "A walk, a dog.", 1, 0.2),
                row(311, "prompt", "Dogs walk.", 2),
                row(1472, "sae", "A film.", 2, 0.1),
            ],
            "summary": {
                "sae": {**method, "loss_ratio": 1.28},
                "diffmean": {**method, "harmonic": 0.54, "loss_ratio": 1.39},
                "prompt": {**method, "harmonic": 0.8, "loss_ratio": 1.17},
                "unsteered": {"rows": 20, "on_concept": 0.03, "on_concept_ci": [0.0, 0.1], "concept_any": 0.05}
                | {"instruction": 2.0, "fluency": 2.0},
            },
        },
    )


def test_demo_figures_block_holds_the_run_numbers(tmp_path):
    figures = load_demo_figures()
    write_run(tmp_path / "runs")
    block = figures.main(["--runs", str(tmp_path / "runs"), "--cpu", "Test CPU 9000 (2 cores)"])
    assert block.startswith(figures.BEGIN) and block.endswith(figures.END)
    assert "One run of `python run_pipeline.py` on Test CPU 9000 (2 cores), 2030-01-02" in block
    for expected in (
        "| sentences | 11.1 s | 400 MB | 10,033 documents → 36,341 sentences |",
        "| training | 47.9 s | 3,278 MB |",
        "reused: steering_eval",
        "Pipeline 2.1 min, peak RSS 3.2 GB (stage training)",
        "FVU 0.123, L0 32, 15.2% of latents silent",
        "CE loss recovered 94.0% (CE 3.59 → 4.18 with the SAE, 13.37 zero-ablated), KL 0.70 (128 held-out",
        "4,589 of 4,608 latents fire",
        "4,341 latents explained",
        "mean detection AUROC 0.672",
        "| SAE latent (decoder row) | 20 | 38% [20%–55%] | 50% | 1.92 | 1.77 | 0.47 |",
        "| DiffMean | 20 | 38% [20%–55%] | 50% | 1.92 | 1.77 | 0.54 |",
        "| prompting | 20 | 38% [20%–55%] | 50% | 1.92 | 1.77 | 0.80 |",
        "| unsteered | 20 | 3% [0%–10%] | 5% | 2.00 | 2.00 | — |",
        # the most on-concept SAE latent first, its best SAE row beside the other methods' on that instruction
        "| 311: dog, breed | Describe a walk. | A walk is nice. **0/2/2** | "
        "A walk with a dog \\| a breed. (× 0.4) **2/2/2** | A walk, a dog. (× 0.2) **1/2/2** | Dogs walk. **2/2/2** |",
        "| 1472: film | Describe a walk. |  | A film. (× 0.1) **2/2/2** |  |  |",
    ):
        assert expected in block, expected


def test_demo_figures_write_replaces_only_the_marked_block(tmp_path):
    figures = load_demo_figures()
    write_run(tmp_path / "runs")
    doc = tmp_path / "results.md"
    before, after = "# Results\n\nText before.\n\n", "\n\nText after, kept.\n"
    doc.write_text(f"{before}{figures.BEGIN}\nold numbers 0.999\n{figures.END}{after}")
    block = figures.main(["--runs", str(tmp_path / "runs"), "--cpu", "Test CPU", "--write", str(doc)])
    assert doc.read_text() == before + block + after
    assert "0.999" not in doc.read_text()
    figures.main(["--runs", str(tmp_path / "runs"), "--cpu", "Test CPU", "--write", str(doc)])  # idempotent
    assert doc.read_text() == before + block + after


def test_demo_figures_compare_puts_runs_side_by_side(tmp_path):
    """--compare: each run's stage times and headline numbers in its own column, written between its markers."""
    figures = load_demo_figures()
    write_run(tmp_path / "a")
    write_run(tmp_path / "b")
    doc = json.loads((tmp_path / "b" / "pipeline.json").read_text())
    doc["stages"][1]["seconds"], doc["seconds"], doc["cpu"] = 12.5, 90.0, "Test CPU (AVX2)"
    (tmp_path / "b" / "pipeline.json").write_text(json.dumps(doc))
    out = tmp_path / "results.md"
    out.write_text(f"{figures.BEGIN}\n{figures.END}\nkept\n{figures.COMPARE_BEGIN}\nold\n{figures.COMPARE_END}\n")
    figures.main(
        [
            "--runs",
            str(tmp_path / "a"),
            "--cpu",
            "X",
            "--compare",
            f"before={tmp_path / 'a'}",
            f"after={tmp_path / 'b'}",
        ]
        + ["--write", str(out)]
    )
    text = out.read_text()
    assert "kept" in text and "\nold\n" not in text
    for expected in (
        "| stage | before | after |",
        "| training | 47.9 s | 12.5 s |",
        "| **pipeline** | **2.1 min** | **1.5 min** |",
        "| validation FVU | 0.123 | 0.123 |",
        "| steering on-concept: SAE latent (decoder row) | 38% [20%–55%] | 38% [20%–55%] |",
        "- **after**: `python run_pipeline.py` on Test CPU (AVX2)",
    ):
        assert expected in text, expected


def test_demo_figures_refuses_a_file_without_markers(tmp_path):
    figures = load_demo_figures()
    write_run(tmp_path / "runs")
    doc = tmp_path / "plain.md"
    doc.write_text("no markers here\n")
    with pytest.raises(SystemExit):
        figures.main(["--runs", str(tmp_path / "runs"), "--cpu", "Test CPU", "--write", str(doc)])
    assert doc.read_text() == "no markers here\n"


def test_the_suite_doc_is_generated_from_the_bench_results(tmp_path):
    """bench/bench_suite.py's doc and report from a synthetic results file: every figure comes from it."""
    spec = importlib.util.spec_from_file_location("bench_suite", REPO / "bench" / "bench_suite.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bucket = [
        {"positions": [1, 32], "fvu": 0.111, "delta_lm_loss": 0.222},
        {"positions": [32, 767], "fvu": 0.333, "delta_lm_loss": 0.444},
    ]
    rows = [
        {
            "id": f"L{layer}{site}-8x",
            "hook_point": f"{kind}.{layer}",
            "output_hook_point": out,
            "layer": layer,
            "site": site,
            "expansion": 8,
            "l0": 32.0,
            "fvu": 0.25,
            "explained_variance": 0.75,
            "dead_pct": 1.5,
            "ce_loss_recovered": 0.9,
            "delta_lm_loss": 0.123,
            "kl": 0.0456,
            "long_context": {"buckets": bucket},
        }
        for layer in (5, 15)
        for site, kind, out in (("R", "resid_post", ""), ("TC", "ffn_norm", f"mlp_out.{layer}"))
    ]
    results = {
        "cpu": "Test CPU 9000",
        "threads": 2,
        "torch": "9.9",
        "suite": {
            "layers": [5, 15],
            "sites": ["R", "TC"],
            "expansions": [8],
            "k": 32,
            "tokens": 1234,
            "hook_points": ["a"] * 4,
            "seconds": {"capture": 1, "preprocessing": 2, "training_one_pass": 3, "long_context": 4, "total": 60},
            "rows": rows,
        },
        "cost": {
            "saes": ["L15R-8x", "L15TC-8x"],
            "train_tokens_each": 999,
            "n_runs_seconds": 20,
            "one_pass_seconds": 10,
            "seconds_per_sae": {"n_runs": 10, "one_pass": 5},
            "one_pass_speedup": 2.0,
            "peak_rss_mb": {"largest_single_run": 500, "one_pass_of_all": 700},
            "tokens_per_s_per_sae": {"n_runs": 100, "one_pass": 200},
            "loop_sae_tokens_per_s": {"n_runs": 300, "one_pass": 400},
            "sparsify": {"tokens_per_s": 250.0},
            "one_pass_loop_vs_sparsify_loop": 1.6,
        },
    }
    text = bench.doc_markdown(results, "images")
    assert (
        "Test CPU 9000" in text
        and "| L15TC-8x | ffn_norm.15 → mlp_out.15 | 32 | 0.750 | 1.5 | 90.0% | 0.123 | 0.046 |" in text
    )
    assert "0.333" in text and "2.00x" in text and "1.60x sparsify's" in text
    bench.write_report(tmp_path / "report.html", results)
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") == 2
