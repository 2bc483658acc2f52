"""The steering judge's validation set (tests/data/steering_ratings) and agreement with it.

<folder>/rows.jsonl          {"id", "concept", "instruction", "response", "source": {where the row came from}}
<folder>/ratings_<r>.jsonl   one rater's {"id", "concept", "instruction", "fluency"} (0-2, GUIDE.md's rubric)
<folder>/labels.jsonl        the consensus per row and score: the two raters' score where they agree, else the
                             median of theirs and a third rater's (consensus_labels)
<folder>/GUIDE.md            the rating guide and how the ratings were made

A row's split is fixed by its id (a hash): "dev" rows fitted the offline judge's thresholds, "test" rows did not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from llama_3.checkpoints import load_model
from pipeline.interpret.batches import DEFAULT_MODEL
from pipeline.interpret.embedding import SentenceEncoder
from pipeline.steering.evaluation import Row, read_continuations
from pipeline.steering.judge import THRESHOLDS, JudgeItem, OfflineJudge, Thresholds, rate, run_claude_judge

RATINGS_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "steering_ratings"
SCORES = ("concept", "instruction", "fluency")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_of(row_id: str) -> str:
    return "dev" if hashlib.sha256(row_id.encode()).digest()[0] % 2 == 0 else "test"


def consensus_labels(folder: Path) -> int:
    """labels.jsonl from the raters' files: per row and score, the score two raters agree on, else the median of
    every rating the row has (a third rater rates the rows the first two disagree on)."""
    ratings: dict[str, dict[str, list[int]]] = {}
    for path in sorted(folder.glob("ratings_*.jsonl")):
        for r in read_jsonl(path):
            for k in SCORES:
                ratings.setdefault(r["id"], {s: [] for s in SCORES})[k].append(int(r[k]))
    rows = read_jsonl(folder / "rows.jsonl")
    out = []
    for row in rows:
        got = ratings.get(row["id"])
        if not got or any(len(v) < 2 for v in got.values()):
            continue
        label = {"id": row["id"], "raters": len(got["concept"])}
        for k, v in got.items():
            label[k] = v[0] if len(v) == 2 and v[0] == v[1] else sorted(v)[len(v) // 2]
        out.append(label)
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    return len(out)


def load_rated_rows(folder: Path = RATINGS_DIR, split: str = "all") -> list[dict]:
    """rows.jsonl joined with labels.jsonl ("labels": {score: 0-2}), of one split or all."""
    labels = {r["id"]: r for r in read_jsonl(folder / "labels.jsonl")}
    rows = [
        r | {"labels": {k: labels[r["id"]][k] for k in SCORES}}
        for r in read_jsonl(folder / "rows.jsonl")
        if r["id"] in labels
    ]
    return [r for r in rows if split == "all" or split_of(r["id"]) == split]


def cohen_kappa(a: list[int], b: list[int], weighted: bool = False, levels: int = 3) -> float:
    """Cohen's kappa of two raters' 0..levels-1 scores (quadratic weights when `weighted`)."""
    n = len(a)
    if n == 0:
        return float("nan")
    observed = [[0.0] * levels for _ in range(levels)]
    for x, y in zip(a, b):
        observed[x][y] += 1 / n
    row = [sum(observed[i]) for i in range(levels)]
    col = [sum(observed[i][j] for i in range(levels)) for j in range(levels)]

    def weight(i: int, j: int) -> float:
        return ((i - j) / (levels - 1)) ** 2 if weighted else float(i != j)

    disagree = sum(weight(i, j) * observed[i][j] for i in range(levels) for j in range(levels))
    chance = sum(weight(i, j) * row[i] * col[j] for i in range(levels) for j in range(levels))
    return 1.0 - disagree / chance if chance > 0 else float("nan")


def confusion(truth: list[int], predicted: list[int], levels: int = 3) -> list[list[int]]:
    """[hand score][judge score] counts."""
    m = [[0] * levels for _ in range(levels)]
    for t, p in zip(truth, predicted):
        m[t][p] += 1
    return m


def agreement(rows: list[dict], predicted: list[dict], keys=SCORES) -> dict:
    """Per score: exact match, Cohen's kappa (unweighted and quadratic), confusion matrix; rows a judge could
    not score (None) are counted as missing."""
    out = {}
    for k in keys:
        pairs = [(r["labels"][k], p[k]) for r, p in zip(rows, predicted) if p is not None and p.get(k) is not None]
        truth, guess = [t for t, _ in pairs], [g for _, g in pairs]
        out[k] = {
            "rows": len(pairs),
            "missing": len(rows) - len(pairs),
            "exact": sum(t == g for t, g in pairs) / len(pairs) if pairs else float("nan"),
            "kappa": cohen_kappa(truth, guess),
            "weighted_kappa": cohen_kappa(truth, guess, weighted=True),
            "confusion": confusion(truth, guess),
        }
    return out


def format_agreement(doc: dict) -> str:
    lines = []
    for k, a in doc.items():
        lines.append(
            f"{k:>11}: exact {a['exact']:.0%}  kappa {a['kappa']:.2f}  weighted kappa {a['weighted_kappa']:.2f}  "
            f"({a['rows']} rows{', ' + str(a['missing']) + ' unscored' if a['missing'] else ''})"
        )
        lines.append(f"{'':>13}hand \\ judge    0    1    2")
        for i, row in enumerate(a["confusion"]):
            lines.append(f"{'':>13}{i:>12} " + " ".join(f"{c:4d}" for c in row))
    return "\n".join(lines)


def judge_offline(rows: list[dict], model: str | None = None, thresholds: Thresholds = THRESHOLDS) -> list[dict]:
    """The offline judge's scores and features of each row (the clean embedded model reads each response after
    its instruction, as the steering evaluation does)."""
    loaded = load_model(model)
    tok = loaded.tokenizer
    reads = []
    for r in rows:
        prompt = loaded.chat_format.encode_dialog([{"role": "user", "content": r["instruction"]}])
        reads.append(Row(0, "none", None, None, prompt, tok.encode(r["response"], bos=False), r["response"]))
    losses = [loss for loss, _ in read_continuations(loaded.model, None, reads)]
    items = [JudgeItem(r["concept"], r["instruction"], r["response"], loss) for r, loss in zip(rows, losses)]
    return OfflineJudge(SentenceEncoder(), thresholds).score(items)


def kappa_of(rows: list[dict], features: list[dict], key: str, t: Thresholds) -> tuple[float, float]:
    truth = [r["labels"][key] for r in rows]
    guess = [rate(f, t)[key] for f in features]
    return cohen_kappa(truth, guess), sum(a == b for a, b in zip(truth, guess)) / max(len(rows), 1)


def fit_thresholds(rows: list[dict], features: list[dict]) -> Thresholds:
    """The thresholds with the best Cohen's kappa (then exact match) per score on these rows, by grid search:
    concept (word similarity, mentions, cosine), instruction (cosine), fluency (loss, then loops)."""

    def grid(lo: float, hi: float, step: float) -> list[float]:
        return [round(lo + i * step, 4) for i in range(int(round((hi - lo) / step)) + 1)]

    def pairs(values: list[float]) -> list[tuple[float, float]]:
        return [(a, b) for a in values for b in values if b >= a]

    best = THRESHOLDS
    candidates = [
        replace(best, word_similarity=w, concept_mentions=m, concept_cosine=c)
        for w in grid(0.45, 0.8, 0.05)
        for m in [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (1, 99), (99, 99)]
        for c in pairs(grid(0.15, 0.7, 0.025) + [9.0])
    ]
    best = max(candidates, key=lambda t: kappa_of(rows, features, "concept", t))
    candidates = [
        replace(best, instruction_cosine=c, instruction_added_offset=o)
        for c in pairs(grid(-0.1, 0.7, 0.02) + [9.0])
        for o in [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 9.0]
    ]
    best = max(candidates, key=lambda t: kappa_of(rows, features, "instruction", t))
    off = (99.0, 99.0)
    candidates = [replace(best, fluency_loss=c, fluency_loop=(9.0, 9.0)) for c in pairs(grid(0.5, 6.0, 0.1) + [off[0]])]
    best = max(candidates, key=lambda t: kappa_of(rows, features, "fluency", t))
    candidates = [replace(best, fluency_loop=c) for c in pairs(grid(0.05, 1.0, 0.05) + [9.0])]
    return max(candidates, key=lambda t: kappa_of(rows, features, "fluency", t))


def judge_with_claude(
    rows: list[dict], work: Path, model: str | None = None, base_url: str | None = None, poll_seconds: float = 60.0
) -> list:
    """Claude's scores of each row through one Message Batch (ANTHROPIC_API_KEY; the batch state lives in `work`, so
    a second call collects what the first sent); None for a row whose answer did not parse."""
    items = [{k: r[k] for k in ("concept", "instruction", "response")} for r in rows]
    work.mkdir(parents=True, exist_ok=True)
    got = run_claude_judge(items, work, base_url, poll_seconds, 0.0, model or DEFAULT_MODEL)
    return [got.get(i) for i in range(len(rows))]
