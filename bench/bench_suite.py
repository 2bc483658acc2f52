"""An SAE suite on the embedded model, Llama Scope style: layers x sites x widths from one capture and one
training pass, evaluated in one table; plus what one pass saves, Llama Scope's training variants and feature
splitting. Not part of the main command (~30 min on 2 CPU cores at the defaults).

    python bench/bench_suite.py                                  # layers 5 15 25 x R A M TC x 8x 32x
    python bench/bench_suite.py --layers 15 --expansions 8 --max-sentences 1024 --work /tmp/suite   # a smoke run
    python bench/bench_suite.py --parts variants splitting       # on the main run's data (runs/)
    python bench/bench_suite.py --write-doc                      # also docs/suite.md and its plots

Parts (--parts, default all):
- suite: capture_activations.py stores every site of every layer in one pass (R = resid_post.L, A = attn_out.L,
  M = mlp_out.L, and the transcoder's pair ffn_norm.L -> mlp_out.L); sae_preprocessing.py shuffles each with one
  seed (so the transcoder's rows pair); sae_training.py --suite trains every SAE in one pass over the batches.
  Then the long-context check: FVU and delta LM loss by token position on running text 4x longer than the
  longest training sentence. Writes <work>/report.html (table and plots).
- cost: N SAEs of the suite trained as N sae_training.py processes vs one --suite process, same data, and
  sparsify's trainer on one of them (bench/bench_sae.py's loop): seconds and peak RSS per SAE.
- variants: on the main run's data (runs/preprocessed), today's recipe against Llama Scope's TopK by decoder
  norm, K-annealing and the TopK -> JumpReLU post-processing (FVU, L0, dead, CE loss recovered each), trained in
  one pass.
- splitting: the main run's 8x SAE (runs/sae) against a 2x SAE on the same data (another seed): each 8x
  latent's nearest 2x latent by decoder cosine; the distribution, and 2x latents split into several 8x ones
  with the 8x meanings side by side, as a page of the main run's feature browser
  (runs/interpretation/browser/splitting.html).

Everything lands in bench/results/suite.json (the figures the docs show come from it: --write-doc).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama_3 import load_model  # noqa: E402
from llama_3.cpu_fast import apply_cpu_fast_paths  # noqa: E402
from llama_3.cpu_features import cpu_name  # noqa: E402
from pipeline.interpret.meanings import load_meanings  # noqa: E402
from pipeline.preprocessing.preprocessed import PreprocessedOutput  # noqa: E402
from pipeline.sae.formats import llama_scope_id, sae_sha256  # noqa: E402
from pipeline.sae.jumprelu import jumprelu_thresholds, to_jumprelu  # noqa: E402
from pipeline.sae.model import TopKSae  # noqa: E402
from pipeline.sae.splice_eval import splice_eval  # noqa: E402
from pipeline.sae.suite_eval import feature_splitting, long_context_profiles, long_sequences, suite_row  # noqa: E402
from pipeline.sentences.dataset import iter_sentences, sentence_texts  # noqa: E402

SITE_HOOKS = {"R": ["resid_post"], "A": ["attn_out"], "M": ["mlp_out"], "TC": ["ffn_norm", "mlp_out"]}
RESULTS = REPO / "bench" / "results" / "suite.json"


PEAK_RSS_MB: dict[str, float] = {}
"""Each finished child's own peak RSS, by its log file's name."""


def high_water_mb(pid: int) -> float:
    """The process's peak RSS so far (/proc VmHWM). Not rusage: Linux carries the parent's high-water mark into
    a forked child's, and this bench process holds a model."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(argv: list[str], log: Path) -> float:
    """A stage script in its own process; its seconds (its peak RSS in PEAK_RSS_MB, polled every 0.1 s). A
    failure stops the bench with the log's last line."""
    t0 = time.perf_counter()
    peak = 0.0
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, high_water_mb(proc.pid))
            time.sleep(0.1)
    PEAK_RSS_MB[log.name] = peak
    if proc.returncode:
        last = (log.read_text().strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{' '.join(argv[:1])} failed (exit {proc.returncode}): {last}; see {log}")
    return time.perf_counter() - t0


def suite_entries(work: Path, layers: list[int], sites: list[str], expansions: list[int], k: int) -> list[dict]:
    entries = []
    for layer in layers:
        for site in sites:
            for expansion in expansions:
                hooks = [f"{kind}.{layer}" for kind in SITE_HOOKS[site]]
                name = f"L{layer}{site}-{expansion}x"
                entry = {"data": str(work / "preprocessed" / hooks[0]), "out": str(work / "sae" / name)}
                if site == "TC":
                    entry["target_data"] = str(work / "preprocessed" / hooks[1])
                entries.append({**entry, "expansion": expansion, "k": k})
    return entries


def capture_and_preprocess(args, work: Path) -> dict:
    hooks = sorted({f"{kind}.{layer}" for layer in args.layers for s in args.sites for kind in SITE_HOOKS[s]})
    seconds = {}
    seconds["capture"] = run(
        [
            "capture_activations.py",
            "--sentences",
            str(args.sentences),
            "--out",
            str(work / "activations"),
            "--max-sentences",
            str(args.max_sentences),
            "--hook-points",
            *hooks,
        ],
        work / "capture.log",
    )
    seconds["preprocessing"] = 0.0
    for hook in hooks:
        seconds["preprocessing"] += run(
            [
                "sae_preprocessing.py",
                "--capture",
                str(work / "activations"),
                "--out",
                str(work / "preprocessed" / hook),
                "--hook-point",
                hook,
            ],
            work / f"preprocess_{hook}.log",
        )
    return {"hook_points": hooks, "seconds": seconds}


def train_suite(entries: list[dict], path: Path, log: Path, extra: list[str] = ()) -> float:
    path.write_text(json.dumps(entries, indent=1))
    return run(["sae_training.py", "--suite", str(path), "--wandb", "disabled", *extra], log)


def long_context(args, rows: list[dict]) -> None:
    """Every SAE of the suite on running text: --long-sequences of 4x the longest training sentence."""
    lm = load_model(TopKSae.load(Path(rows[0]["run"]) / "sae").model_path(None), dtype=torch.float32)
    apply_cpu_fast_paths(lm.model)
    texts = [t for part in iter_sentences(args.sentences) for t in part["text"]][-4000:]  # held apart from capture
    context = TopKSae.load(Path(rows[0]["run"]) / "sae").cfg.tokenization.sequence_tokens
    sequences = long_sequences(lm.tokenizer, texts, 4 * context, args.long_sequences)
    edges = [0, 32, context, 2 * context, 4 * context]
    saes = [TopKSae.load(Path(row["run"]) / "sae").eval() for row in rows]
    for row, profile in zip(rows, long_context_profiles(lm, saes, sequences, edges)):
        row["long_context"] = profile
        print(f"long context {row['id']}: {json.dumps(profile['buckets'])}", flush=True)


def part_suite(args, work: Path, results: dict) -> None:
    t0 = time.perf_counter()
    prepared = capture_and_preprocess(args, work)
    entries = suite_entries(work, args.layers, args.sites, args.expansions, args.k)
    train_s = train_suite(entries, work / "suite.json", work / "train.log")
    rows = [suite_row(e["out"]) for e in entries]
    for row in rows:
        row["id"] = llama_scope_id(TopKSae.load(Path(row["run"]) / "sae").cfg)
    long_s = time.perf_counter()
    long_context(args, rows)
    results["suite"] = {
        "layers": args.layers,
        "sites": args.sites,
        "expansions": args.expansions,
        "k": args.k,
        "max_sentences": args.max_sentences,
        "tokens": json.loads((work / "activations" / "manifest.json").read_text())["counts"]["tokens"],
        "hook_points": prepared["hook_points"],
        "seconds": {
            **{k: round(v, 1) for k, v in prepared["seconds"].items()},
            "training_one_pass": round(train_s, 1),
            "long_context": round(time.perf_counter() - long_s, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "rows": rows,
    }
    write_report(work / "report.html", results)


def part_cost(args, work: Path, results: dict) -> None:
    """N SAEs one process each vs one --suite process, each with its spliced evaluation (what a run is: the one
    pass shares the model and the clean forward); sparsify's loop on one of them (its per-SAE cost)."""
    entries = suite_entries(work, [args.layers[len(args.layers) // 2]], args.sites, [args.expansions[0]], args.k)
    entries = [{**e, "out": e["out"].replace("/sae/", "/cost/alone/")} for e in entries]  # spliced evaluation on
    alone = 0.0
    for i, e in enumerate(entries):
        flags = ["--wandb", "disabled", "--force"]
        for key, value in e.items():
            flags += [f"--{key.replace('_', '-')}", str(value)]
        alone += run(["sae_training.py", *flags], work / f"cost_alone_{i}.log")
    rss_alone = max(PEAK_RSS_MB[f"cost_alone_{i}.log"] for i in range(len(entries)))
    together = [{**e, "out": e["out"].replace("/alone/", "/suite/")} for e in entries]
    one_pass = train_suite(together, work / "cost_suite.json", work / "cost_suite.log", ["--force"])
    rss_suite = PEAK_RSS_MB["cost_suite.log"]
    # the training loops' own tokens/s per SAE (the manifests': no process start, no data opening)
    loop = {
        kind: [suite_row(e["out"])["train_tokens_per_s"] for e in group]
        for kind, group in (("n_runs", entries), ("one_pass", together))
    }
    tokens = json.loads((Path(entries[0]["data"]) / "manifest.json").read_text())["counts"]["train_tokens"]
    n = len(entries)
    sparsify = sparsify_tokens_per_s(args, entries[0]["data"], work)
    results["cost"] = {
        "saes": [Path(e["out"]).name for e in entries],
        "train_tokens_each": tokens,
        "n_runs_seconds": round(alone, 1),
        "one_pass_seconds": round(one_pass, 1),
        "seconds_per_sae": {"n_runs": round(alone / n, 2), "one_pass": round(one_pass / n, 2)},
        "one_pass_speedup": round(alone / one_pass, 3),
        "peak_rss_mb": {"largest_single_run": round(rss_alone), "one_pass_of_all": round(rss_suite)},
        "tokens_per_s_per_sae": {"n_runs": round(n * tokens / alone), "one_pass": round(n * tokens / one_pass)},
        # SAE-tokens per second of the loops: a one-pass manifest's rate is the pass's, shared by its n SAEs
        "loop_sae_tokens_per_s": {"n_runs": round(sum(loop["n_runs"]) / n), "one_pass": round(sum(loop["one_pass"]))},
        "sparsify": sparsify,
    }
    if "tokens_per_s" in sparsify:
        ours = results["cost"]["loop_sae_tokens_per_s"]["one_pass"]
        results["cost"]["one_pass_loop_vs_sparsify_loop"] = round(ours / sparsify["tokens_per_s"], 3)
    print(json.dumps(results["cost"], indent=1), flush=True)


def sparsify_tokens_per_s(args, data: str, work: Path) -> dict:
    """bench/bench_sae.py's sparsify contender (its SparseCoder and training loop on cached rows), one SAE of the
    same width and batch; its training-loop tokens/s (no process start, no data opening)."""
    saved = REPO / "bench" / "results" / "bench_sae.json"
    keep = saved.read_text() if saved.is_file() else None
    d = PreprocessedOutput.open(data).d_model
    try:
        run(
            [
                "bench/bench_sae.py",
                "--data",
                data,
                "--only",
                "sparsify_adam_fp32",
                "--n-latents",
                str(args.expansions[0] * d),
                "--k",
                str(args.k),
                "--batch-size",
                "1024",
            ],
            work / "cost_sparsify.log",
        )
        got = json.loads(saved.read_text()).get("sparsify_adam_fp32", {})
    except SystemExit as e:
        return {"failed": str(e)}
    finally:
        if keep is not None:
            saved.write_text(keep)
    return {k: got[k] for k in ("tokens_per_s", "fvu", "peak_rss_mb") if k in got} or {"failed": json.dumps(got)}


def part_variants(args, work: Path, results: dict) -> None:
    """Today's recipe, TopK by decoder norm and K-annealing in one pass on runs/; then the TopK -> JumpReLU
    post-processing of today's SAE."""
    data = REPO / "runs" / "preprocessed"
    steps = -(-PreprocessedOutput.open(data).manifest["counts"]["train_tokens"] // 1024)
    v = work / "variants"
    entries = [
        {"data": str(data), "out": str(v / "base")},
        {"data": str(data), "out": str(v / "topk_by_decoder_norm"), "topk_by_decoder_norm": True},
        {"data": str(data), "out": str(v / "k_annealing"), "k_start": 4 * 32, "k_anneal_steps": steps // 4},
    ]
    seconds = train_suite(entries, work / "variants.json", work / "variants.log", ["--force"])
    rows = {}
    for e in entries:
        r = suite_row(e["out"])
        rows[Path(e["out"]).name] = {k: r[k] for k in ("fvu", "l0", "dead_pct", "ce_loss_recovered", "delta_lm_loss")}
    rows["jumprelu_postprocessed"] = jumprelu_row(v / "base" / "sae", data)
    results["variants"] = {
        "data": str(data.relative_to(REPO)),
        "train_seconds_one_pass": round(seconds, 1),
        "k_annealing": {"k_start": 4 * 32, "k_anneal_steps": steps // 4, "steps": steps},
        "rows": rows,
    }
    print(json.dumps(results["variants"], indent=1), flush=True)


def jumprelu_row(sae_dir: Path, data: Path) -> dict:
    """Post-process the SAE to JumpReLU on 64k of its training tokens; FVU, L0, dead on the validation tokens and
    its own spliced CE on the training stage's held-out sentences."""
    sae = TopKSae.load(sae_dir).eval()
    pre = PreprocessedOutput.open(data)
    train = pre.reader("train")
    n = min(len(train), 65536)
    thresholds, summary = jumprelu_thresholds(sae, lambda: (train[a : min(a + 8192, n)] for a in range(0, n, 8192)))
    jump = to_jumprelu(sae, thresholds)
    jump.save(sae_dir.parent.parent / "jumprelu" / "sae")
    val = pre.activations("val").float()
    mean = torch.tensor(pre.stats["mean"])
    # Tokens with outlier norms (massive activations past the first position) cross most thresholds at once,
    # which TopK caps at k: the FVU is also given without the 0.1% largest-norm validation tokens.
    norms = val.norm(dim=1)
    typical = norms <= norms.quantile(0.999)
    with torch.no_grad():
        err, dev, l0, fired = 0.0, 0.0, 0.0, torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
        err_typ, dev_typ, l0_max = 0.0, 0.0, 0
        for x, keep in zip(val.split(4096), typical.split(4096)):
            out = jump(x)
            e, v = (out.x_hat - x).double().pow(2).sum(1), (x.double() - mean).pow(2).sum(1)
            err, dev = err + float(e.sum()), dev + float(v.sum())
            err_typ, dev_typ = err_typ + float(e[keep].sum()), dev_typ + float(v[keep].sum())
            active = out.values > 0
            l0 += float(active.sum())
            l0_max = max(l0_max, int(active.sum(1).max()))
            fired[out.indices[active]] = True
        topk_typ = sum(
            float((sae(x[k]).x_hat - x[k]).double().pow(2).sum()) for x, k in zip(val.split(4096), typical.split(4096))
        )
    lm = load_model(sae.model_path(None), dtype=torch.float32)
    apply_cpu_fast_paths(lm.model)
    texts = sentence_texts(sae.cfg.trained_on.sentences, pre.val_sentence_ids()[:128].tolist())
    spliced = splice_eval(lm, jump.reconstruct, texts, jump.cfg.site_hook_point, jump.cfg.tokenization)
    return {
        "fvu": err / dev,
        "fvu_without_outlier_tokens": err_typ / dev_typ,
        "topk_fvu_without_outlier_tokens": topk_typ / dev_typ,
        "l0_max": l0_max,
        "l0": l0 / len(val),
        "dead_pct": 100 * float((~fired).float().mean()),
        "ce_loss_recovered": spliced["eval/ce_loss_recovered"],
        "delta_lm_loss": spliced["eval/ce_sae"] - spliced["eval/ce_clean"],
        "calibration": summary,
    }


def part_splitting(args, work: Path, results: dict) -> None:
    """The main run's 8x SAE against a 2x SAE trained on the same data with another seed (with the same seed
    the 8x SAE's first 1,152 decoder rows would start where the 2x SAE's do, and stay near them)."""
    wide_dir, narrow_dir = REPO / "runs" / "sae" / "sae", work / "splitting" / "narrow_2x" / "sae"
    data = REPO / "runs" / "preprocessed"
    flags = ["--data", str(data), "--out", str(narrow_dir.parent), "--expansion", "2", "--seed", "1"]
    run(["sae_training.py", *flags, "--wandb", "disabled", "--eval-sentences", "0"], work / "splitting.log")
    wide, narrow = TopKSae.load(wide_dir), TopKSae.load(narrow_dir)
    split = feature_splitting(narrow, wide)
    meanings = load_meanings(REPO / "latent_index_meaning", sae_sha256(wide_dir))
    cos = split.cosine
    back = feature_splitting(wide, narrow).cosine  # each narrow latent's nearest wide latent
    children = split.children(args.min_cosine)
    sizes = torch.tensor([len(v) for v in children.values()], dtype=torch.float)
    examples = []
    for parent, kids in children.items():
        named = [k for k in kids if meanings.get(k, {}).get("meaning")]
        if len(named) >= 3:
            kids = sorted(kids, key=lambda k: -float(cos[k]))
            examples.append(
                {
                    "narrow_latent": parent,
                    "wide": [
                        {
                            "latent": k,
                            "cosine": round(float(cos[k]), 3),
                            "meaning": meanings.get(k, {}).get("meaning", ""),
                        }
                        for k in kids
                    ],
                }
            )
        if len(examples) == args.split_examples:
            break
    results["splitting"] = {
        "narrow": {
            "run": str(narrow_dir.relative_to(REPO)) if narrow_dir.is_relative_to(REPO) else str(narrow_dir),
            "n_latents": narrow.cfg.n_latents,
        },
        "wide": {"run": "runs/sae/sae", "n_latents": wide.cfg.n_latents},
        "cosine_quantiles": {str(q): round(float(cos.quantile(q)), 3) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
        "narrow_to_wide_cosine_quantiles": {str(q): round(float(back.quantile(q)), 3) for q in (0.1, 0.5, 0.9)},
        "min_cosine": args.min_cosine,
        "wide_matched": int((cos >= args.min_cosine).sum()),
        "narrow_with_children": len(children),
        "children_per_narrow": {
            "mean": round(float(sizes.mean()), 2) if len(sizes) else 0,
            "max": int(sizes.max()) if len(sizes) else 0,
            "with_3_or_more": int((sizes >= 3).sum()),
        },
        "examples": examples,
    }
    browser = REPO / "runs" / "interpretation" / "browser"
    if browser.is_dir():
        (browser / "splitting.html").write_text(splitting_page(results["splitting"]))
        results["splitting"]["page"] = "runs/interpretation/browser/splitting.html"
    print(json.dumps({k: v for k, v in results["splitting"].items() if k != "examples"}, indent=1), flush=True)


def splitting_page(s: dict) -> str:
    """A page of the feature browser: each split 2x latent with its 8x children's meanings side by side."""
    blocks = []
    for ex in s["examples"]:
        cells = "".join(
            f"<tr><td><a href='latents/{w['latent']}.html'>{w['latent']}</a></td><td class='num'>{w['cosine']:.2f}</td>"
            f"<td>{html.escape(w['meaning'])}</td></tr>"
            for w in ex["wide"]
        )
        blocks.append(
            f"<h2>{s['narrow']['n_latents']}-latent SAE, latent {ex['narrow_latent']}: {len(ex['wide'])} latents of "
            f"the {s['wide']['n_latents']}-latent SAE</h2><table><tr><th>latent</th><th>decoder cosine</th>"
            f"<th>meaning</th></tr>{cells}</table>"
        )
    q = s["cosine_quantiles"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Feature splitting</title>"
        "<style>body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:70em}table{border-collapse:"
        "collapse;width:100%}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}.num{text-align:right}"
        "</style></head><body><p><a href='index.html'>all latents</a></p><h1>Feature splitting</h1>"
        f"<p>Each latent of this SAE ({s['wide']['n_latents']} latents) matched to the nearest latent of a "
        f"{s['narrow']['n_latents']}-latent SAE trained on the same activations, by decoder cosine (median "
        f"{q['0.5']:.2f}, quartiles {q['0.25']:.2f}–{q['0.75']:.2f}). With cosine ≥ {s['min_cosine']}, "
        f"{s['children_per_narrow']['with_3_or_more']} narrow latents have three or more wide ones: "
        "the narrow feature split into finer ones. Written by bench/bench_suite.py.</p>"
        + "".join(blocks)
        + "</body></html>\n"
    )


def plots(results: dict) -> dict[str, bytes]:
    """PNG figures: per site, explained variance / delta LM loss / dead % against layer (one line per width), as
    Gemma Scope's and Llama Scope's figures; and the long-context FVU and delta loss by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["suite"]["rows"]
    out = {}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    metrics = [
        ("explained_variance", "explained variance"),
        ("delta_lm_loss", "delta LM loss (nats)"),
        ("ce_loss_recovered", "CE loss recovered"),
        ("dead_pct", "dead latents (%)"),
    ]
    for ax, (key, label) in zip(axes, metrics):
        for color, site in enumerate(results["suite"]["sites"]):  # one colour per site, one line style per width
            for expansion in results["suite"]["expansions"]:
                pts = sorted((r["layer"], r[key]) for r in rows if r["site"] == site and r["expansion"] == expansion)
                if pts:
                    style = "-" if expansion == results["suite"]["expansions"][0] else "--"
                    ax.plot(*zip(*pts), style, color=f"C{color}", marker="o", label=f"{site} {expansion}x")
        ax.set_xlabel("layer")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out["suite_layers.png"] = _png(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sites, layers = results["suite"]["sites"], results["suite"]["layers"]
    styles = ["-", "--", ":", "-."]
    for r in rows:
        if r["expansion"] != results["suite"]["expansions"][0] or "long_context" not in r:
            continue
        b = r["long_context"]["buckets"]
        x = [f"{lo}-{hi}" for lo, hi in (bk["positions"] for bk in b)]
        # one colour per site, one line style per layer
        look = {"color": f"C{sites.index(r['site'])}", "linestyle": styles[layers.index(r["layer"]) % 4], "marker": "o"}
        axes[0].plot(x, [bk["fvu"] for bk in b], label=r["id"], **look)
        axes[1].plot(x, [bk["delta_lm_loss"] for bk in b], label=r["id"], **look)
    axes[0].set_title("FVU by token position")
    axes[1].set_title("delta LM loss by token position")
    for ax in axes:
        ax.set_xlabel("positions")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out["suite_long_context.png"] = _png(fig)
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def table_markdown(results: dict) -> str:
    s = results["suite"]
    head = "| SAE | hook point | L0 | explained variance | dead % | CE loss recovered | delta LM loss | KL |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        hook = r["hook_point"] + (f" → {r['output_hook_point']}" if r["output_hook_point"] else "")
        lines.append(
            f"| {r['id']} | {hook} | {r['l0']:.0f} | {r['explained_variance']:.3f} | {r['dead_pct']:.1f} | "
            f"{r['ce_loss_recovered']:.1%} | {r['delta_lm_loss']:.3f} | {r['kl']:.3f} |"
        )
    return "\n".join(lines)


def long_context_markdown(results: dict) -> str:
    rows = [r for r in results["suite"]["rows"] if "long_context" in r]
    if not rows:
        return ""
    buckets = [f"{lo}–{hi}" for lo, hi in (b["positions"] for b in rows[0]["long_context"]["buckets"])]
    lines = [
        "| SAE | " + " | ".join(f"FVU {b}" for b in buckets) + " | " + " | ".join(f"ΔLM {b}" for b in buckets) + " |"
    ]
    lines.append("|---" * (1 + 2 * len(buckets)) + "|")
    for r in rows:
        b = r["long_context"]["buckets"]
        lines.append(
            f"| {r['id']} | "
            + " | ".join(f"{x['fvu']:.3f}" for x in b)
            + " | "
            + " | ".join(f"{x['delta_lm_loss']:.3f}" for x in b)
            + " |"
        )
    return "\n".join(lines)


def doc_markdown(results: dict, images: str) -> str:
    """Every part's figures as markdown, from bench/results/suite.json (`images`: where the plots are linked)."""
    out = [
        "# An SAE suite on the embedded model",
        "",
        f"Generated by `python bench/bench_suite.py --write-doc` on {results['cpu']}, "
        f"torch {results['torch']}; the numbers are in `bench/results/suite.json`. Definitions: "
        "`pipeline/sae/suite_eval.py` (FVU and dead latents on the validation tokens; delta LM loss = CE with the SAE "
        "spliced in - clean CE, on 128 held-out sentences; a transcoder replaces the MLP).",
    ]
    if "suite" in results:
        s = results["suite"]
        sec = s["seconds"]
        out += [
            "",
            f"## The suite: layers {', '.join(map(str, s['layers']))} x sites {', '.join(s['sites'])} x "
            f"{', '.join(f'{e}x' for e in s['expansions'])}, k = {s['k']}",
            "",
            f"{len(s['rows'])} SAEs from one capture of {s['tokens']:,} tokens ({len(s['hook_points'])} hook points) "
            f"and one training pass. Time: capture {sec['capture']:.0f} s, preprocessing {sec['preprocessing']:.0f} s, "
            f"training (one pass, spliced evaluations included) {sec['training_one_pass']:.0f} s, long-context check "
            f"{sec['long_context']:.0f} s; {sec['total'] / 60:.1f} min in all. R = resid_post (the block's output), "
            "A = attn_out, M = mlp_out, TC = transcoder ffn_norm -> mlp_out (the MLP's input after its norm to its "
            "output).",
            "",
            table_markdown(results),
            "",
            f"![explained variance, delta LM loss, CE recovered and dead latents by layer]({images}/suite_layers.png)",
            "",
            "### Longer contexts",
            "",
            "Running text (consecutive sentences of held-apart documents), 4x the longest sequence the SAEs were "
            "trained on; FVU and delta LM loss by token position (training sentences average ~30 tokens).",
            "",
            long_context_markdown(results),
            "",
            f"![FVU and delta LM loss by token position]({images}/suite_long_context.png)",
        ]
    if "cost" in results:
        c = results["cost"]
        sp = c["sparsify"]
        out += [
            "",
            "## One pass against one run per SAE",
            "",
            f"{len(c['saes'])} SAEs ({', '.join(c['saes'])}), {c['train_tokens_each']:,} training tokens each, with "
            "the spliced evaluation (128 held-out sentences):",
            "",
            "| | seconds | per SAE | tokens/s per SAE | peak RSS (MB) |",
            "|---|---|---|---|---|",
            f"| {len(c['saes'])} sae_training.py runs | {c['n_runs_seconds']:.0f} | "
            f"{c['seconds_per_sae']['n_runs']:.1f} | "
            f"{c['tokens_per_s_per_sae']['n_runs']:,} | {c['peak_rss_mb']['largest_single_run']:,} (largest one) |",
            f"| one --suite pass | {c['one_pass_seconds']:.0f} | {c['seconds_per_sae']['one_pass']:.1f} | "
            f"{c['tokens_per_s_per_sae']['one_pass']:,} | {c['peak_rss_mb']['one_pass_of_all']:,} (all) |",
            "",
            f"One pass is {c['one_pass_speedup']:.2f}x the N runs' speed (process starts, data opening and reads "
            "shared). The training loops alone (the manifests' rates, no process start), in SAE-tokens per second: "
            f"{c['loop_sae_tokens_per_s']['one_pass']:,} in the one pass, {c['loop_sae_tokens_per_s']['n_runs']:,} "
            "in a single run. "
            + (
                f"sparsify's training loop on one of them (bench/bench_sae.py's contender: its SparseCoder on the "
                f"same cached rows and batch): {sp['tokens_per_s']:,.0f} tokens/s, so our one pass trains each SAE "
                f"at {c['one_pass_loop_vs_sparsify_loop']:.2f}x sparsify's per-SAE speed. sparsify's own multi-layer "
                "runs share the model's forward, not the SAEs' work, so from cached activations each SAE costs it "
                "what one does."
                if "tokens_per_s" in sp
                else f"sparsify: {sp.get('failed', 'not run')}."
            ),
        ]
    if "variants" in results:
        v = results["variants"]
        ka = v["k_annealing"]
        names = {
            "base": "today's recipe (TopK, unit-norm decoder rows)",
            "topk_by_decoder_norm": "TopK on activation x decoder norm, free norms",
            "k_annealing": f"K-annealing: k {ka['k_start']} -> 32 over the first {ka['k_anneal_steps']} of "
            f"{ka['steps']} steps",
            "jumprelu_postprocessed": "today's SAE post-processed to JumpReLU (per-latent thresholds)",
        }
        out += [
            "",
            "## Llama Scope's training variants",
            "",
            f"On the main run's data (`{v['data']}`, resid_pre.25, 8x, k 32), trained in one pass "
            f"({v['train_seconds_one_pass']:.0f} s for the three):",
            "",
            "| recipe | FVU | L0 | dead % | CE loss recovered | delta LM loss |",
            "|---|---|---|---|---|---|",
        ]
        for key, r in v["rows"].items():
            out.append(
                f"| {names.get(key, key)} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_pct']:.1f} | "
                f"{r['ce_loss_recovered']:.1%} | {r['delta_lm_loss']:.3f} |"
            )
        jr = v["rows"].get("jumprelu_postprocessed", {})
        if jr.get("calibration"):
            cal = jr["calibration"]
            out += [
                "",
                f"The JumpReLU thresholds come from {cal['calibration_tokens']:,} training tokens: each latent fires "
                "there as often as under TopK (pipeline/sae/jumprelu.py), so its L0 varies per token around k. Its "
                f"FVU is dominated by a few tokens with outlier norms, which cross most thresholds at once (up to "
                f"{jr['l0_max']:,} latents on one token; TopK caps them at k): without the 0.1% largest-norm "
                f"validation tokens its FVU is {jr['fvu_without_outlier_tokens']:.4f} (TopK's "
                f"{jr['topk_fvu_without_outlier_tokens']:.4f}). The spliced CE is barely touched by them.",
            ]
    if "splitting" in results:
        sp = results["splitting"]
        q = sp["cosine_quantiles"]
        out += [
            "",
            "## Feature splitting",
            "",
            f"Each latent of the main run's SAE ({sp['wide']['n_latents']} latents) matched to its nearest latent of a "
            f"{sp['narrow']['n_latents']}-latent SAE trained on the same data with another seed, by decoder cosine: "
            f"median {q['0.5']:.2f} "
            f"(deciles {q['0.1']:.2f}–{q['0.9']:.2f}). {sp['wide_matched']:,} wide latents have a narrow one at "
            "cosine ≥ "
            f"{sp['min_cosine']}; of their {sp['narrow_with_children']:,} narrow latents, "
            f"{sp['children_per_narrow']['with_3_or_more']} have three or more (mean "
            f"{sp['children_per_narrow']['mean']}, "
            f"max {sp['children_per_narrow']['max']}). The other way, each narrow latent's nearest wide one: median "
            f"cosine {sp['narrow_to_wide_cosine_quantiles']['0.5']:.2f} (deciles "
            f"{sp['narrow_to_wide_cosine_quantiles']['0.1']:.2f}–{sp['narrow_to_wide_cosine_quantiles']['0.9']:.2f}). "
            "Examples (the wide latents' offline meanings; the browser page `splitting.html` links each):",
        ]
        for ex in sp["examples"]:
            out += ["", f"- 2x latent {ex['narrow_latent']} ->"]
            out += [f"  - {w['latent']} (cos {w['cosine']:.2f}): {w['meaning']}" for w in ex["wide"]]
    return "\n".join(out) + "\n"


def write_report(path: Path, results: dict) -> None:
    """The suite's report page: the same text as the doc, plots inline."""
    from markdown_it import MarkdownIt

    body = doc_markdown(results, "IMAGES")
    for name, png in plots(results).items():
        body = body.replace(f"IMAGES/{name}", "data:image/png;base64," + base64.b64encode(png).decode())
    page = MarkdownIt("commonmark").enable("table").render(body)
    style = "body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:80em}table{border-collapse:collapse}"
    style += "td,th{padding:2px 8px;border-bottom:1px solid #ddd}img{max-width:100%}"
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{page}</body></html>"
    )


def write_doc(results: dict) -> None:
    images = REPO / "docs" / "images"
    if "suite" in results:
        for name, png in plots(results).items():
            (images / name).write_bytes(png)
    (REPO / "docs" / "suite.md").write_text(doc_markdown(results, "images"))
    print(f"wrote {REPO / 'docs' / 'suite.md'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(REPO / "runs" / "suite"))
    p.add_argument("--sentences", default=str(REPO / "runs" / "sentences"))
    p.add_argument("--layers", type=int, nargs="+", default=[5, 15, 25])
    p.add_argument("--sites", nargs="+", default=["R", "A", "M", "TC"], choices=list(SITE_HOOKS))
    p.add_argument("--expansions", type=int, nargs="+", default=[8, 32])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--max-sentences", type=int, default=8192)
    p.add_argument("--long-sequences", type=int, default=8)
    p.add_argument("--min-cosine", type=float, default=0.5)
    p.add_argument("--split-examples", type=int, default=4)
    p.add_argument("--parts", nargs="*", default=["suite", "cost", "variants", "splitting"], help="none: the doc only")
    p.add_argument("--write-doc", action="store_true", help="write docs/suite.md and docs/images/suite_*.png")
    args = p.parse_args()
    args.sentences = Path(args.sentences)
    if not (args.sentences / "manifest.json").is_file():
        raise SystemExit(f"--sentences {args.sentences}: no sentence dataset (python run_pipeline.py builds one)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.update({"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__})
    for part in args.parts:  # this run's parts start over; the others keep their last run's figures
        results.pop(part, None)
    for part in args.parts:
        t0 = time.perf_counter()
        {"suite": part_suite, "cost": part_cost, "variants": part_variants, "splitting": part_splitting}[part](
            args, work, results
        )
        results.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    if args.write_doc:
        write_doc(results)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
