"""Where the massive activations of a capture are, and which training batches they made spike.

Usage:
    python scripts/massive_activations.py                                   # runs/activations, its first hook
    python scripts/massive_activations.py --capture runs/suite/activations --hook-point resid_post.15
    python scripts/massive_activations.py --preprocessed P --run R          # spikes of a run trained on P

Lists every token whose norm exceeds --ratio x the median norm of the tokens at positions >=
--exclude-first (the rule of sae_preprocessing.py --sink-norm-ratio): per position, how many, their share
of the squared norm, and the sentence starts they come from. With --preprocessed (made with
--sink-norm-ratio 0, so they are still in it) and --run (a training run on it), each step whose loss is
above 2.5x the median of the 10 before it, beside the largest norm in its batch and that token's share of
the batch's squared norm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.capture.activations import CaptureOutput, load_shard  # noqa: E402
from pipeline.preprocessing.preprocessed import PreprocessedOutput  # noqa: E402
from pipeline.preprocessing.stage import META, rows_of, token_norms  # noqa: E402
from pipeline.sae.training import batch_order  # noqa: E402
from pipeline.sentences.dataset import sentence_texts  # noqa: E402


def capture_report(capture: str, hook: str | None, exclude_first: int, ratio: float, examples: int) -> None:
    cap = CaptureOutput.open(capture)
    hook = hook or cap.hook_points[0]
    norms = token_norms(cap, hook, exclude_first)
    flat = np.concatenate(norms)
    kept = flat[np.isfinite(flat)]
    threshold = ratio * float(np.median(kept))
    rows = [rows_of(load_shard(p, META)) for p in cap.shard_paths]
    sids, pos = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
    big = flat > threshold
    share = (flat[big] ** 2).sum() / (kept**2).sum()
    print(
        f"{capture} {hook}: {int(big.sum())} of {len(kept)} tokens (positions >= {exclude_first}) above "
        f"{threshold:.0f} = {ratio:g} x the median {np.median(kept):.0f}; they hold {share:.1%} "
        "of the squared norm"
    )
    for p in np.unique(pos[big]):
        at = big & (pos == p)
        print(f"  position {p}: {int(at.sum())} tokens, {np.median(flat[at]) / np.median(kept):.0f}x the median norm")
    ids = sorted(set(sids[big].tolist()))[:examples]
    for sid, text in zip(ids, sentence_texts(cap.sentences_dir, ids)):
        print(f"    sentence {sid}: {text[:70]!r}")


def spike_report(preprocessed: str, run: str, ratio: float) -> None:
    data = PreprocessedOutput.open(preprocessed)
    x = data.activations("train")
    mean = torch.tensor(data.stats["mean"], dtype=torch.float32)
    norms = torch.cat([(x[a : a + 65536].float() - mean).norm(dim=1) for a in range(0, len(x), 65536)])
    median = float(norms.median())
    cfg = json.loads((Path(run) / "manifest.json").read_text())["config"]
    batch = cfg["batch_size"]
    losses = [json.loads(line).get("train/loss") for line in open(Path(run) / "metrics.jsonl")]
    losses = [v for v in losses if v is not None]
    order = batch_order(len(norms), batch, cfg["seed"], 0)
    print(f"{run}: steps whose loss is > 2.5x the median of the 10 before (centred norms; median {median:.0f})")
    for step, start in enumerate(order[: len(losses)], 1):
        before = losses[max(0, step - 11) : step - 1]
        jump = losses[step - 1] / statistics.median(before) if before else 1.0
        in_batch = norms[start : start + batch]
        if jump > 2.5 or float(in_batch.max()) > ratio * median:
            share = float(in_batch.max() ** 2 / (in_batch**2).sum())
            print(
                f"  step {step}: loss x{jump:.1f}, largest norm {float(in_batch.max()) / median:.0f}x the median, "
                f"that one token {share:.0%} of the batch's squared norm"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capture", default="runs/activations")
    ap.add_argument("--hook-point")
    ap.add_argument("--exclude-first", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--preprocessed")
    ap.add_argument("--run")
    args = ap.parse_args()
    capture_report(args.capture, args.hook_point, args.exclude_first, args.ratio, args.examples)
    if args.preprocessed and args.run:
        spike_report(args.preprocessed, args.run, args.ratio)


if __name__ == "__main__":
    main()
