"""Hand ratings of steered continuations: the steering judge's validation set, and any judge's agreement with it.

Usage:
    # a blind rating sheet sampled from finished steering evaluations (rows shuffled, method/strength/scores
    # hidden) + the key that says where each row came from
    python scripts/steering_ratings.py make --results runs/steering_eval /tmp/l15/steering_eval --out DIR
    # the raters' files (DIR/ratings_*.jsonl, two per row, a third where they disagree) -> DIR/labels.jsonl
    python scripts/steering_ratings.py consensus --folder DIR
    # the offline judge's thresholds fitted on the dev half (what pipeline/steering/judge.py's Thresholds holds)
    python scripts/steering_ratings.py fit
    # a judge's agreement with the labels: exact match, Cohen's kappa, confusion matrices per score
    python scripts/steering_ratings.py agree --judge offline
    python scripts/steering_ratings.py agree --judge claude       # needs ANTHROPIC_API_KEY (one Message Batch)
The set is tests/data/steering_ratings (its GUIDE.md says how it was rated).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_3.errors import PipelineInputError  # noqa: E402
from pipeline.steering.judge import rate  # noqa: E402
from pipeline.steering.judge_validation import (  # noqa: E402
    RATINGS_DIR,
    SCORES,
    agreement,
    consensus_labels,
    fit_thresholds,
    format_agreement,
    judge_offline,
    judge_with_claude,
    load_rated_rows,
)
from pipeline.steering.results import SteeringEvalOutput  # noqa: E402


def make(results: list[Path], out: Path, per_source: int, seed: int) -> None:
    """Sample rows from each evaluation, spread over methods and strengths (failures and loops included: the
    large factors of the sweep), one row per distinct (concept, instruction, text)."""
    rng = random.Random(seed)
    quota = {"none": 0.15, "prompt": 0.2, "sae": 0.35, "diffmean": 0.3}
    rows, seen = [], set()
    for folder in results:
        done = SteeringEvalOutput.open(folder)
        concept = {r["latent"]: r["concept"] for r in done.latents}
        by_method: dict[str, list] = {}
        for r in done.rows:
            by_method.setdefault(r.method, []).append(r)
        for method, share in quota.items():
            pool = by_method.get(method, [])
            rng.shuffle(pool)
            taken = 0
            for r in pool:
                key = (concept[r.latent], r.instruction, r.text)
                if taken >= round(share * per_source) or key in seen:
                    continue
                seen.add(key)
                taken += 1
                rows.append(
                    {
                        "concept": concept[r.latent],
                        "instruction": r.instruction,
                        "response": r.text,
                        "source": {
                            "results": str(folder),
                            "hook_point": done.hook_point,
                            "sae_sha256": done.sae_sha256[:8],
                            "latent": r.latent,
                            "method": r.method,
                            "factor": r.factor,
                            "phase": r.phase,
                        },
                    }
                )
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rows.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"s{i:03d}", **r}) + "\n")
    with open(out / "sheet.jsonl", "w") as f:  # what raters see
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"s{i:03d}", **{k: r[k] for k in ("concept", "instruction", "response")}}) + "\n")
    print(f"wrote {len(rows)} rows to {out} ({dict(Counter(r['source']['method'] for r in rows))})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--results", nargs="+", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--per-source", type=int, default=130)
    m.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("consensus")
    c.add_argument("--folder", type=Path, default=RATINGS_DIR)
    f = sub.add_parser("fit")
    f.add_argument("--folder", type=Path, default=RATINGS_DIR)
    a = sub.add_parser("agree")
    a.add_argument("--folder", type=Path, default=RATINGS_DIR)
    a.add_argument("--judge", choices=("offline", "claude"), default="offline")
    a.add_argument("--split", choices=("all", "dev", "test"), default="all")
    a.add_argument("--claude-model", default=None)
    a.add_argument("--work", type=Path, default=Path("runs/steering_judge_validation"), help="Claude batch state")
    a.add_argument("--out", type=Path, help="also write the agreement as JSON here")
    args = p.parse_args()
    if args.command == "make":
        make(args.results, args.out, args.per_source, args.seed)
    elif args.command == "consensus":
        n = consensus_labels(args.folder)
        print(f"wrote {args.folder / 'labels.jsonl'} ({n} rows)")
    elif args.command == "fit":
        dev, test = load_rated_rows(args.folder, "dev"), load_rated_rows(args.folder, "test")
        features = judge_offline(dev + test)
        fitted = fit_thresholds(dev, features[: len(dev)])
        print(f"fitted on {len(dev)} dev rows: {fitted}")
        for name, part, feats in (("dev", dev, features[: len(dev)]), ("test", test, features[len(dev) :])):
            predicted = [f | rate(f, fitted) for f in feats]
            print(f"--- {name} ({len(part)} rows)\n{format_agreement(agreement(part, predicted, SCORES))}")
    else:
        rows = load_rated_rows(args.folder, args.split)
        if args.judge == "offline":
            predicted = judge_offline(rows)
        elif not os.environ.get("ANTHROPIC_API_KEY"):
            raise PipelineInputError("--judge claude needs ANTHROPIC_API_KEY in the environment (one Message Batch)")
        else:
            predicted = judge_with_claude(rows, args.work, args.claude_model)
        result = agreement(rows, predicted, SCORES)
        print(f"{args.judge} judge vs hand labels, {len(rows)} rows ({args.split}):")
        print(format_agreement(result))
        if args.out:
            args.out.write_text(json.dumps({"judge": args.judge, "split": args.split, "agreement": result}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except PipelineInputError as e:  # e.g. --judge claude without ANTHROPIC_API_KEY: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
