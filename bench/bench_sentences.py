"""Benchmark the sentence dataset: build and read throughput, and memory on a multi-GB corpus.

    python bench/bench_sentences.py                 # embedded corpus + a generated 2 GB text file
    python bench/bench_sentences.py --big-gb 0      # embedded corpus only

1. Builds the embedded Wikipedia summaries from scratch (Punkt training included), then reads
   them back tokenized with the default model's tokenizer: sentences/s, tokens/s, counts.
2. Generates a text file of --big-gb GB (the summaries repeated, blank-line separated), builds it
   and reads it all, each in a child process whose peak RSS is measured: memory must stay flat
   while the corpus grows by orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

READ_SNIPPET = """
import json, sys, time, resource
from llama_3 import load_tokenizer
from pipeline.sentences.dataset import SentenceTokenDataset
tok = load_tokenizer(None)
ds = SentenceTokenDataset(sys.argv[1], tok)
t = time.perf_counter()
for _ in ds:
    pass
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, **ds.stats, "tokens_per_s": ds.stats["tokens"] / dt,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# Runs a script in a fresh interpreter and prints that process's own peak RSS on the last line.
SCRIPT_SNIPPET = """
import resource, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run_child(args: list[str]) -> tuple[str, float]:
    """Run a child python; return (stdout, seconds)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return r.stdout, time.perf_counter() - t


def run_script(args: list[str]) -> tuple[float, float]:
    """Run a stage script; return (seconds, its peak RSS in MB)."""
    out, seconds = run_child(["-c", SCRIPT_SNIPPET, *args])
    return seconds, float(out.strip().splitlines()[-1])


def generate_big_text(path: Path, gb: float) -> int:
    from pipeline.sentences.text_sources import WikiSummariesSource

    docs = [r.text for r in WikiSummariesSource().records(10**9) if hasattr(r, "text")]
    target, written, rep = int(gb * 1e9), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for d in docs:
                s = f"{d} This is copy {rep}.\n\n"
                f.write(s)
                written += len(s.encode())
                if written >= target:
                    break
            rep += 1
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big-gb", type=float, default=2.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seconds, wiki_rss = run_script(["openwebtext_sentences_dataset.py", "--out", str(tmp / "wiki")])
        m = json.loads((tmp / "wiki" / "manifest.json").read_text())
        read = json.loads(run_child(["-c", READ_SNIPPET, str(tmp / "wiki")])[0])
        results["embedded"] = {
            "documents": m["counts"]["documents"],
            "sentences": m["counts"]["sentences"],
            "characters": m["counts"]["characters"],
            "build_seconds_total": round(seconds, 1),
            "punkt_train_seconds": m["splitter"].get("train_seconds"),
            "build_peak_rss_mb": round(wiki_rss),
            "read_peak_rss_mb": round(read["peak_rss_mb"]),
            "build_sentences_per_s": m["throughput"]["sentences_per_s"],
            "tokens": read["tokens"],
            "truncated_sentences": read["truncated_sentences"],
            "read_tokens_per_s": round(read["tokens_per_s"]),
            "padding_fraction": round(1 - read["tokens"] / read["padded_tokens"], 4),
        }
        print(json.dumps(results["embedded"], indent=2))
        if args.big_gb > 0:
            big = tmp / "big.txt"
            nbytes = generate_big_text(big, args.big_gb)
            build_s, build_rss = run_script(
                [
                    "openwebtext_sentences_dataset.py",
                    "--input",
                    str(big),
                    "--out",
                    str(tmp / "big"),
                    "--splitter",
                    "trained",
                ]
            )
            mb = json.loads((tmp / "big" / "manifest.json").read_text())
            read = json.loads(run_child(["-c", READ_SNIPPET, str(tmp / "big")])[0])
            results["big"] = {
                "text_bytes": nbytes,
                "documents": mb["counts"]["documents"],
                "sentences": mb["counts"]["sentences"],
                "build_seconds": round(build_s),
                "build_sentences_per_s": mb["throughput"]["sentences_per_s"],
                "build_peak_rss_mb": round(build_rss),
                "tokens": read["tokens"],
                "read_tokens_per_s": round(read["tokens_per_s"]),
                "read_peak_rss_mb": round(read["peak_rss_mb"]),
                "dataset_bytes": sum(s["bytes"] for s in mb["shards"]),
            }
            print(json.dumps(results["big"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
