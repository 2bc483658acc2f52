"""Benchmark preprocessing: GB/s against a plain sequential read of the same capture files (the I/O limit).

    python bench/bench_preprocessing.py [--capture runs/activations] [--workers 2]

Both run on a warm page cache (the plain read goes first and again last; the best is the limit).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.capture.activations import CaptureOutput
from pipeline.preprocessing.config import PreprocessConfig
from pipeline.preprocessing.stage import preprocess


def plain_read(paths: list[Path]) -> float:
    t, n = time.perf_counter(), 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                n += len(block)
    return n / 1e9 / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--capture", default=str(REPO / "runs" / "activations"))
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = p.parse_args()
    paths = CaptureOutput.open(args.capture).shard_paths
    limit = max(plain_read(paths), plain_read(paths))
    out = {"capture_gb": sum(p.stat().st_size for p in paths) / 1e9, "plain_read_gb_per_s": limit}
    for w in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            preprocess(PreprocessConfig(capture=args.capture, out=tmp, workers=w))
            gbs = out["capture_gb"] / (time.perf_counter() - t)
        out[f"preprocess_gb_per_s_{w}_workers"] = gbs
        out[f"ratio_to_read_{w}_workers"] = gbs / limit
    limit = max(limit, plain_read(paths))
    out["plain_read_gb_per_s"] = limit
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
