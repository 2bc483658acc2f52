"""The steering judge against hand ratings (tests/data/steering_ratings): the agreement arithmetic against
brute force, the consensus rule, and the offline judge's agreement on the rows its thresholds were not fitted on."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.steering.judge_validation import (
    RATINGS_DIR,
    agreement,
    cohen_kappa,
    consensus_labels,
    judge_offline,
    load_rated_rows,
    split_of,
)


def brute_kappa(a, b, weighted=False):
    """Cohen's kappa from its definition, with numpy (quadratic weights when weighted)."""
    a, b = np.array(a), np.array(b)
    w = np.array([[((i - j) / 2) ** 2 if weighted else float(i != j) for j in range(3)] for i in range(3)])
    observed = np.zeros((3, 3))
    np.add.at(observed, (a, b), 1 / len(a))
    expected = np.outer(observed.sum(1), observed.sum(0))
    return 1 - (w * observed).sum() / (w * expected).sum()


def test_kappa_and_confusion_equal_brute_force():
    rng = random.Random(0)
    a = [rng.randrange(3) for _ in range(200)]
    b = [x if rng.random() < 0.6 else rng.randrange(3) for x in a]
    assert cohen_kappa(a, b) == pytest.approx(brute_kappa(a, b))
    assert cohen_kappa(a, b, weighted=True) == pytest.approx(brute_kappa(a, b, weighted=True))
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    rows = [{"labels": {"concept": x}} for x in a]
    got = agreement(rows, [{"concept": y} for y in b] + [], keys=("concept",))["concept"]
    assert got["exact"] == pytest.approx(np.mean(np.array(a) == np.array(b)))
    assert got["confusion"][2][1] == sum(1 for x, y in zip(a, b) if (x, y) == (2, 1))


def test_consensus_is_the_agreed_score_else_the_median_of_three(tmp_path):
    rows = [{"id": f"s{i}", "concept": "c", "instruction": "i", "response": "r"} for i in range(3)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(name, scores):
        lines = [{"id": f"s{i}", "concept": c, "instruction": c, "fluency": c} for i, c in scores.items()]
        (tmp_path / f"ratings_{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    write("a", {0: 2, 1: 0, 2: 1})
    write("b", {0: 2, 1: 2, 2: 1})
    write("c", {1: 1})  # the third rater rates only the row the first two disagree on
    assert consensus_labels(tmp_path) == 3
    labels = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [x["concept"] for x in labels] == [2, 1, 1] and [x["raters"] for x in labels] == [2, 3, 2]


def test_the_set_is_big_enough_and_double_rated():
    rows = load_rated_rows(RATINGS_DIR)
    assert len(rows) >= 200
    methods = {r["source"]["method"] for r in rows}
    assert methods == {"none", "sae", "diffmean", "prompt"}
    assert len({r["source"]["hook_point"] for r in rows}) >= 2  # several SAEs and layers
    assert {split_of(r["id"]) for r in rows} == {"dev", "test"}


def test_the_offline_judge_agrees_with_the_hand_ratings_it_was_not_fitted_on():
    """The held-out half of the hand ratings: concept kappa >= 0.6 (the issue's bar), instruction and
    fluency too; the old judge's kappas on these rows were 0.45 / 0.38 / 0.50 (judge_before.jsonl)."""
    rows = load_rated_rows(RATINGS_DIR, "test")
    got = agreement(rows, judge_offline(rows))
    assert got["concept"]["kappa"] >= 0.6
    assert got["instruction"]["kappa"] >= 0.55 and got["fluency"]["kappa"] >= 0.6
    before = {json.loads(x)["id"]: json.loads(x) for x in (RATINGS_DIR / "judge_before.jsonl").read_text().splitlines()}
    old = agreement(rows, [before[r["id"]] for r in rows])
    assert all(got[k]["kappa"] > old[k]["kappa"] for k in ("concept", "instruction", "fluency"))


def test_the_claude_judge_is_measured_on_the_same_rows_through_one_batch(tmp_path, monkeypatch):
    """`steering_ratings.py agree --judge claude` against a local Message Batches server (the real SDK): every row
    goes out once with AxBench's rubric, answers that do not parse count as missing, a second call sends nothing."""
    from fake_batches_server import FakeBatches

    from pipeline.steering.judge_validation import judge_with_claude

    rows = load_rated_rows(RATINGS_DIR)[:12]
    by_response = {r["response"]: r["labels"] for r in rows}

    def answer(cid, params):
        prompt = params["messages"][0]["content"]
        response = prompt.split("Response: ", 1)[1].split("\n\nRate the response")[0]
        labels = by_response[response]
        if labels["concept"] == 1:
            return "succeeded", "I cannot rate this."
        return "succeeded", json.dumps(labels)

    server = FakeBatches(answer, polls_until_end=1)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-key")
    try:
        got = judge_with_claude(rows, tmp_path / "claude", base_url=server.url, poll_seconds=0.01)
        again = judge_with_claude(rows, tmp_path / "claude", base_url=server.url, poll_seconds=0.01)
        assert server.create_attempts == 1 and again == got
    finally:
        server.close()
    result = agreement(rows, got)
    unparsed = sum(r["labels"]["concept"] == 1 for r in rows)
    assert result["concept"]["missing"] == unparsed and result["concept"]["exact"] == 1.0
