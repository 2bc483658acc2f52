"""Hand ratings of latent meanings: make the blind rating sheets, then score the judges against the ratings.

Usage:
    # sheets for raters (rows shuffled, explainer and scores hidden) + the key that unblinds them
    python scripts/meaning_ratings.py make --meanings latent_index_meaning/<sae>-offline-concept.json \
        --old latent_index_meaning/<sae>-offline-ngram.json --out tests/data/meaning_ratings
    # each judge's rank correlation with the ratings, and the old-vs-new preference (-> <folder>/scores.json)
    python scripts/meaning_ratings.py score --folder tests/data/meaning_ratings --meanings <the same file>
The rating guide is tests/data/meaning_ratings/GUIDE.md.
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.interpret.batches import mark_tokens  # noqa: E402
from pipeline.interpret.config import ParseConfig  # noqa: E402
from pipeline.interpret.embedding import E5Encoder, SentenceEncoder  # noqa: E402
from pipeline.interpret.explainers import LatentExamples, detection_scores  # noqa: E402
from pipeline.top_sentences.tables import open_top_sentences  # noqa: E402


def examples_of(ex: LatentExamples, lat: int, n: int = 5) -> dict:
    """The top n sentences and n from across the activation range (evenly spaced through the random activating
    sample, strongest first), activations marked «like this»(0-10) against the top peak."""
    rows = ex.top[lat]
    peak = max(max(r["token_activations"], default=0) for r in rows)

    def marked(part):
        return [mark_tokens(ex.sentences[r["sentence_id"]]["tokens"], r["token_activations"], peak) for r in part]

    sample = ex.sampled.get(lat) or rows[20:]  # outputs before the sample: further down the ranking
    spread = [sample[round(i * (len(sample) - 1) / max(n - 1, 1))] for i in range(min(n, len(sample)))]
    return {"top": marked(rows[:n]), "quantiles": marked(spread)}


def make(meanings: Path, old: Path, top_sentences: Path, out: Path, n_rated: int, n_pairs: int, seed: int) -> None:
    ex = LatentExamples.load(open_top_sentences(top_sentences), "max")
    new = {e["latent"]: e for e in json.loads(meanings.read_text())["latents"]}
    before = {e["latent"]: e for e in json.loads(old.read_text())["latents"]}
    lats = sorted(lat for lat in new if lat in before and len(ex.top.get(lat, [])) >= 30)
    rng = random.Random(seed)
    rated = rng.sample(lats, n_rated)
    paired = rng.sample(lats, n_pairs)
    rows, key = [], {}
    for i, lat in enumerate(rated):
        rows.append({"id": f"r{i:03d}", "meaning": new[lat]["meaning"], **examples_of(ex, lat)})
        key[f"r{i:03d}"] = {"latent": lat, "meaning": new[lat]["meaning"]}
    pairs = []
    for i, lat in enumerate(paired):
        a_is_new = rng.random() < 0.5
        a, b = (new[lat], before[lat]) if a_is_new else (before[lat], new[lat])
        pairs.append({"id": f"p{i:03d}", "meaning_a": a["meaning"], "meaning_b": b["meaning"], **examples_of(ex, lat)})
        key[f"p{i:03d}"] = {"latent": lat, "new": "a" if a_is_new else "b"}
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (out / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    (out / "key.json").write_text(json.dumps({"meanings": str(meanings), "old": str(old), "rows": key}, indent=1))
    print(f"{out}: {len(rows)} rows to rate, {len(pairs)} pairs to compare")


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation with average ranks for ties."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def judge_scores(folder: Path, top_sentences: Path) -> tuple[dict, dict]:
    """Each judge's detection AUROC for every rated meaning, on the parse stage's held-out split: rows -> {id: {judge:
    score}}, pairs -> {id: {judge: (score of a, score of b)}}."""
    key = json.loads((folder / "key.json").read_text())["rows"]
    rows = {r["id"]: r["meaning"] for r in map(json.loads, (folder / "rows.jsonl").read_text().splitlines())}
    pairs = {p["id"]: p for p in map(json.loads, (folder / "pairs.jsonl").read_text().splitlines())}
    ex = LatentExamples.load(open_top_sentences(top_sentences), "max")
    cfg = ParseConfig()
    row_scores, pair_scores = defaultdict(dict), defaultdict(dict)
    for name, encoder in (("minilm-auroc", SentenceEncoder()), ("e5-auroc", E5Encoder())):
        # rows: one meaning per latent, so one call; a pair's two meanings share a latent, so one call each
        got = detection_scores({key[rid]["latent"]: m for rid, m in rows.items()}, ex, cfg.test_set(), encoder)
        for rid in rows:
            row_scores[rid][name] = got[key[rid]["latent"]]
        for pid, p in pairs.items():
            lat = key[pid]["latent"]
            a, b = (detection_scores({lat: p[m]}, ex, cfg.test_set(), encoder)[lat] for m in ("meaning_a", "meaning_b"))
            pair_scores[pid][name] = (a, b)
    return dict(row_scores), dict(pair_scores)


def score(folder: Path, meanings: Path, top_sentences: Path) -> dict:
    """Spearman of each judge (recomputed for the rated meanings) and of the explainer's certainty with the hand
    ratings; the blind old-vs-new preference and how often each judge prefers the one the rater did."""
    key = json.loads((folder / "key.json").read_text())["rows"]
    certainty = {e["latent"]: e for e in json.loads(meanings.read_text())["latents"]}
    ratings = [json.loads(line) for line in (folder / "ratings.jsonl").read_text().splitlines() if line.strip()]
    row_scores, pair_scores = judge_scores(folder, top_sentences)
    rated = [r for r in ratings if r["id"] in row_scores and "rating" in r]
    hand = [float(r["rating"]) for r in rated]
    report = {"rated": len(rated), "mean_rating": round(sum(hand) / max(len(hand), 1), 3)}
    report["share_rated"] = {str(v): round(sum(h == v for h in hand) / max(len(hand), 1), 3) for v in (0, 1, 2)}
    for judge in ("minilm-auroc", "e5-auroc"):
        scores = [row_scores[r["id"]][judge] for r in rated]
        report[f"mean_{judge}"] = round(sum(scores) / len(scores), 3)
        report[f"spearman_{judge}"] = round(spearman(hand, scores), 3)
    entries = [(h, certainty.get(key[r["id"]]["latent"]), key[r["id"]]["meaning"]) for h, r in zip(hand, rated)]
    same_meaning = [(h, e["certainty"]) for h, e, m in entries if e and e["meaning"] == m]
    report["spearman_certainty"] = round(spearman(*map(list, zip(*same_meaning))), 3)
    prefs = [r for r in ratings if r["id"] in pair_scores and "prefer" in r]
    report["pairs"] = {}
    for rater in sorted({r.get("rater", "") for r in prefs}):
        mine = [r for r in prefs if r.get("rater", "") == rater]
        new = sum(r["prefer"] == key[r["id"]]["new"] for r in mine)
        tie = sum(r["prefer"] == "same" for r in mine)
        report["pairs"][rater or "rater"] = {
            "n": len(mine),
            "prefer_new": new,
            "prefer_old": len(mine) - new - tie,
            "same": tie,
        }
    by_rater = defaultdict(dict)
    for r in prefs:
        by_rater[r.get("rater", "")][r["id"]] = r["prefer"]
    if len(by_rater) == 2:
        first, second = by_rater.values()
        shared = sorted(set(first) & set(second))
        report["pairs"]["raters_agree"] = f"{sum(first[i] == second[i] for i in shared)}/{len(shared)}"
    for judge in ("minilm-auroc", "e5-auroc"):
        prefers_new = sum(
            (pair_scores[p][judge][0] > pair_scores[p][judge][1]) == (key[p]["new"] == "a") for p in pair_scores
        )
        decided = [r for r in prefs if r["prefer"] != "same"]
        agree = sum(
            (pair_scores[r["id"]][judge][0] > pair_scores[r["id"]][judge][1]) == (r["prefer"] == "a") for r in decided
        )
        report["pairs"][f"{judge}_prefers_new"] = f"{prefers_new}/{len(pair_scores)}"
        report["pairs"][f"{judge}_agrees_with_raters"] = f"{agree}/{len(decided)}"
    print(json.dumps(report, indent=1))
    (folder / "scores.json").write_text(json.dumps(report, indent=1) + "\n")  # what docs cite: never hand-copied
    return report


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--meanings", type=Path, required=True)
    m.add_argument("--old", type=Path, required=True)
    m.add_argument("--top-sentences", type=Path, default=Path("runs/top_sentences"))
    m.add_argument("--out", type=Path, default=Path("tests/data/meaning_ratings"))
    m.add_argument("--n-rated", type=int, default=120)
    m.add_argument("--n-pairs", type=int, default=50)
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("--folder", type=Path, default=Path("tests/data/meaning_ratings"))
    s.add_argument("--meanings", type=Path, required=True, help="the meaning file the rated rows came from")
    s.add_argument("--top-sentences", type=Path, default=Path("runs/top_sentences"))
    a = p.parse_args()
    if a.cmd == "make":
        make(a.meanings, a.old, a.top_sentences, a.out, a.n_rated, a.n_pairs, a.seed)
    else:
        score(a.folder, a.meanings, a.top_sentences)
