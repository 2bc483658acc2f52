"""Interpretation: send/retrieve/parse through the real anthropic client against a local Message
Batches server; every result type, 429 retry, crash between create and record, no key on disk;
verdict parsing; the offline explainer and MiniLM judge on sentences written here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_batches_server import FakeBatches

from interpret_top_sentences_parse_responses import main as parse_main
from interpret_top_sentences_retrieve_batches import main as retrieve_main
from interpret_top_sentences_send_batches import main as send_main
from pipeline.core.manifest import make_manifest, write_json_atomic
from pipeline.interpret.batches import BatchState, chunk_requests, parse_verdict
from pipeline.interpret.config import ParseConfig, RetrieveConfig, SendConfig
from pipeline.interpret.explainers import LatentExamples, TestSet, auroc, concept_answers, minilm_scores
from pipeline.top_sentences.tables import KIND, open_top_sentences

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-ant-test-DO-NOT-WRITE-0123456789"
RIVER = [
    "The river flows into the lake near the town.",
    "Fish swim up the river every spring.",
    "A boat drifted down the river at dawn.",
    "The lake froze over in January.",
    "They built a bridge across the river.",
    "The river banks flooded after the storm.",
    "Swans nest on the lake shore.",
    "The river carved a deep canyon.",
    "We rowed across the lake to the island.",
    "Trout live in the cold river water.",
    "The river delta is home to many birds.",
    "The lake is fed by three mountain streams.",
]
OTHER = [
    "The committee approved the annual budget.",
    "She plays the violin in an orchestra.",
    "The software update fixed a bug.",
    "Prices rose by three percent last year.",
    "The museum opened a new wing.",
    "He wrote a novel about the war.",
    "The train leaves at noon.",
    "Tomatoes grow best in warm weather.",
    "The election results were announced.",
    "The team won the championship.",
    "A new vaccine was approved.",
    "The bakery sells fresh bread daily.",
]


def write_top_sentences(directory: Path, n_latents: int = 6, sampled: bool = True) -> Path:
    """A top-sentences folder in the stage's format: every latent fires on river/lake tokens of RIVER; its random
    sample holds them too; half of OTHER are its random silent sentences, half its hard negatives (they hold " the").
    sampled=False: the format before samples and hard negatives (every OTHER sentence a random silent one)."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = RIVER + OTHER
    tokens = [[w if i == 0 else " " + w for i, w in enumerate(t.split(" "))] for t in texts]
    rows = {"latent": [], "aggregation": [], "rank": [], "sentence_id": [], "score": [], "token_activations": []}
    for lat in range(n_latents):
        for rank, sid in enumerate(range(len(RIVER))):
            acts = [2.0 if w.strip(" .").lower() in ("river", "lake") else 0.0 for w in tokens[sid]]
            for agg in ("mean", "max", "last") + (("sample",) if sampled else ()):
                rows["latent"].append(lat), rows["aggregation"].append(agg), rows["rank"].append(rank)
                rows["sentence_id"].append(sid), rows["score"].append(max(acts)), rows["token_activations"].append(acts)
    pq.write_table(pa.table(rows), directory / "top_sentences.parquet")
    silent = [(lat, sid) for lat in range(n_latents) for sid in range(len(RIVER), len(texts))]
    kinds = {"kind": [["random", "shares_token"][s[1] >= len(RIVER) + len(OTHER) // 2] for s in silent]}
    pq.write_table(
        pa.table(
            {"latent": [s[0] for s in silent], "sentence_id": [s[1] for s in silent]}
            | (kinds | {"token": [" the" if k == "shares_token" else None for k in kinds["kind"]]} if sampled else {})
        ),
        directory / "non_activating.parquet",
    )
    pq.write_table(
        pa.table({"latent": list(range(n_latents)), "frequency": [0.1 - 0.01 * i for i in range(n_latents)]}),
        directory / "latent_stats.parquet",
    )
    pq.write_table(
        pa.table({"sentence_id": list(range(len(texts))), "text": texts, "tokens": tokens}),
        directory / "sentences.parquet",
    )
    write_json_atomic(
        directory / "manifest.json",
        make_manifest(
            KIND,
            config={},
            inputs={"sae": "sae", "sae_sha256": "ab" * 32},
            counts={"latents": n_latents},
            fingerprint="fake",
        ),
    )
    return directory


VERDICT = 'Key words: river, lake.\n```json\n{"meaning": "rivers and lakes", "certainty": 0.9}\n```'


def answers(cid: str, params: dict):
    lat, attempt = int(cid.split("-")[1]), int(cid.split("-")[2])
    assert KEY not in json.dumps(params)
    table = {
        0: ("succeeded", VERDICT),
        1: ("errored", "overloaded"),
        2: ("expired", None),
        3: ("succeeded", "I cannot tell."),
        4: ("canceled", None),
        5: ("succeeded", 'Analysis...\n{"meaning": "water bodies", "certainty": 85}'),
    }
    if attempt > 0:  # retried requests succeed
        return "succeeded", '{"meaning": "retried meaning", "certainty": 0.5}'
    return table[lat]


def files_text(*roots: Path) -> str:
    return "".join(p.read_text(errors="ignore") for r in roots for p in r.rglob("*") if p.is_file())


def test_full_cycle_every_result_type_429_resend_and_no_key_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    top = write_top_sentences(tmp_path / "top")
    server = FakeBatches(answers, polls_until_end=1, fail_creates=1)
    try:
        common = dict(out=str(tmp_path / "interp"), base_url=server.url, max_retries=3)
        send_main(SendConfig(top_sentences=str(top), **common))
        assert server.create_attempts == 2 and len(server.batches) == 1  # the 429 was retried, one batch created
        r1 = retrieve_main(RetrieveConfig(**common))
        assert r1["running"] == 1  # still processing on the first poll
        r2 = retrieve_main(RetrieveConfig(**common))
        assert r2["running"] == 0 and r2["counts"] == {"succeeded": 3, "errored": 1, "expired": 1, "canceled": 1}
        m = parse_main(
            ParseConfig(
                top_sentences=str(top), browser=False, out=str(tmp_path / "interp"), meanings=str(tmp_path / "meanings")
            )
        )
        doc = json.loads(Path(m["meaning_file"]).read_text())
        got = {e["latent"]: e for e in doc["latents"]}
        assert set(got) == {0, 5} and got[0]["meaning"] == "rivers and lakes" and got[5]["certainty"] == 0.85
        # Claude's meanings are scored by the same two judges as the offline explainer's, and ordered by the score
        assert all({"minilm-auroc", "e5-auroc"} <= set(e["scores"]) for e in doc["latents"])
        assert [e["score"] for e in doc["latents"]] == sorted((e["score"] for e in doc["latents"]), reverse=True)
        failures = [
            json.loads(x) for x in (tmp_path / "interp" / "explain" / "parse_failures.jsonl").read_text().splitlines()
        ]
        assert {f["latent"]: f["reason"] for f in failures} == {
            1: "request errored",
            2: "request expired",
            3: "no JSON object with a 'meaning' field",
            4: "request canceled",
        }
        # a re-run resubmits exactly the errored, expired and canceled latents
        send_main(SendConfig(top_sentences=str(top), **common))
        assert len(server.batches) == 2
        assert sorted(r["custom_id"] for r in server.batches["msgbatch_0001"]["requests"]) == [
            "explain-1-1",
            "explain-2-1",
            "explain-4-1",
        ]
        retrieve_main(RetrieveConfig(**common, wait=True, poll_seconds=0.01))
        send_main(SendConfig(top_sentences=str(top), **common))  # nothing left to send
        assert len(server.batches) == 2
        m = parse_main(
            ParseConfig(
                top_sentences=str(top), browser=False, out=str(tmp_path / "interp"), meanings=str(tmp_path / "meanings")
            )
        )
        assert m["counts"]["explained"] == 5 and m["counts"]["failures"] == 1
        assert any(
            KEY in (h.get("x-api-key", ""), h.get("authorization", "").removeprefix("Bearer "))
            for h in server.headers_seen
        )  # sent ...
    finally:
        server.close()
    assert KEY not in files_text(tmp_path)  # ... and written nowhere


def test_crash_between_create_and_record_neither_resubmits_nor_loses(tmp_path):
    top = write_top_sentences(tmp_path / "top", n_latents=3)
    server = FakeBatches(lambda cid, p: ("succeeded", VERDICT), polls_until_end=0)
    try:
        env = {**os.environ, "ANTHROPIC_API_KEY": KEY, "PIPELINE_FAULTS": "interpret_send.after_create=exit:9"}
        args = [
            sys.executable,
            "interpret_top_sentences_send_batches.py",
            "--top-sentences",
            str(top),
            "--out",
            str(tmp_path / "interp"),
            "--base-url",
            server.url,
        ]
        p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 9 and len(server.batches) == 1
        state = BatchState.load(tmp_path / "interp" / "explain")
        assert state.submissions[0]["batch_id"] is None  # died before recording the batch id
        env.pop("PIPELINE_FAULTS")
        p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert len(server.batches) == 1  # adopted, not sent again
        p = subprocess.run(
            [
                sys.executable,
                "interpret_top_sentences_retrieve_batches.py",
                "--out",
                str(tmp_path / "interp"),
                "--base-url",
                server.url,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        assert sorted(BatchState.load(tmp_path / "interp" / "explain").requests) == [
            "explain-0-0",
            "explain-1-0",
            "explain-2-0",
        ]
        assert all(
            e["status"] == "succeeded" for e in BatchState.load(tmp_path / "interp" / "explain").requests.values()
        )
    finally:
        server.close()
    assert KEY not in files_text(tmp_path)


def test_dry_run_writes_requests_and_offline_run_needs_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    top = write_top_sentences(tmp_path / "top", sampled=False)
    out = str(tmp_path / "interp")
    r = send_main(SendConfig(top_sentences=str(top), out=out, dry_run=True, max_latents=4))
    lines = [json.loads(x) for x in (tmp_path / "interp" / "explain" / "dry_run.jsonl").read_text().splitlines()]
    assert len(lines) == 4 == r["requests"] and "«river»(10)" in lines[0]["params"]["messages"][0]["content"]
    assert r["estimate"]["usd_est"] > 0
    send_main(SendConfig(top_sentences=str(top), out=out))
    m = parse_main(
        ParseConfig(
            browser=False,
            top_sentences=str(top),
            out=out,
            meanings=str(tmp_path / "meanings"),
            skip_top=6,
            judge_activating=6,
        )
    )
    # an output of the format before samples: the judges test on the top ones the explainer did not see
    assert m["counts"]["test_sentences"]["activating"] == 6 * 6 and m["counts"]["test_sentences"]["hard_negatives"] == 0
    assert m["explainer"] == "offline-concept" and m["counts"]["explained"] == 6
    doc = json.loads(Path(m["meaning_file"]).read_text())
    assert "river" in doc["latents"][0]["meaning"] and doc["latents"][0]["scores"]["minilm-auroc"] > 0.8


def test_claude_sees_the_top_sentences_then_half_the_sample_and_is_judged_on_the_other_half(tmp_path, monkeypatch):
    """The explain request lists what the offline explainer trains on (top 6, then the sample's even ranks not among
    them) and says which are which; none of the judges' activating test sentences is in it."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    top = write_top_sentences(tmp_path / "top", n_latents=1)
    send_main(SendConfig(top_sentences=str(top), out=str(tmp_path / "i"), dry_run=True, sentences_per_latent=6))
    line = json.loads((tmp_path / "i" / "explain" / "dry_run.jsonl").read_text().splitlines()[0])
    prompt = line["params"]["messages"][0]["content"]
    assert "the first 6 are those where it activates most strongly" in prompt
    shown = [RIVER[sid].split(" ")[1] for sid in (0, 1, 2, 3, 4, 5, 6, 8, 10)]  # a word of each, in order
    listed = re.findall(r"^(\d+)\. (.*)$", prompt.split("Analyse step by step")[0], flags=re.M)
    assert [int(n) for n, _ in listed] == list(range(1, 10))
    assert all(word in text for word, (_, text) in zip(shown, listed))
    ex = LatentExamples.load(open_top_sentences(top), "max")
    held, _ = ex.judge_split(0, 20, 20, 10, n_top=6)
    assert held == [7, 9, 11]


@pytest.mark.parametrize(
    "text,expect",
    [
        ('{"meaning": "dates", "certainty": 0.7}', ("dates", 0.7)),
        ('analysis\n```json\n{"meaning": "dates", "certainty": 1}\n```\n', ("dates", 1.0)),
        ('Sure! {"meaning": "dates", "certainty": 85} hope that helps', ("dates", 0.85)),
        ('{"meaning": "a", "certainty": 0.1} then corrected: {"meaning": "b", "certainty": "0.6"}', ("b", 0.6)),
        ('{"meaning": "x  \\n y", "certainty": "70%"}', ("x y", 0.7)),
        ('{"meaning": "", "certainty": 0.5}', "empty or non-string meaning"),
        ('{"meaning": "dates", "certainty": 140}', "outside [0, 1]"),
        ('{"meaning": "dates", "certainty": "high"}', "not a number"),
        ('{"meaning": "dates", "certainty": true}', "not a number"),
        ('{"meaning": "dates"', "no JSON object"),
        ("no verdict at all", "no JSON object"),
    ],
)
def test_parse_awkward_answers(text, expect):
    verdict, reason = parse_verdict(text)
    if isinstance(expect, tuple):
        assert verdict == {"meaning": expect[0], "certainty": expect[1]}
    else:
        assert verdict is None and expect in reason


def test_offline_judge_ranks_correct_explanation_above_wrong_one(tmp_path):
    data = open_top_sentences(write_top_sentences(tmp_path / "top", n_latents=2))
    ex = LatentExamples.load(data, "max")
    test = TestSet(activating=6, silent=6, hard=6, skip_top=6)
    scores = minilm_scores({0: "rivers and lakes", 1: "elections, budgets and committees"}, ex, test)
    assert scores[0] > 0.9 and scores[1] < 0.5 and scores[0] > scores[1]
    assert auroc([3, 2], [1, 0]) == 1.0 and auroc([1], [1]) == 0.5 and auroc([0], [1]) == 0.0


def test_batches_respect_the_api_limits():
    reqs = [{"custom_id": f"explain-{i}-0", "params": {"x": "y" * 100}} for i in range(25)]
    chunks = chunk_requests(reqs, max_requests=10, max_bytes=10**9)
    assert [len(c) for c in chunks] == [10, 10, 5]
    size = max(len(json.dumps(r).encode()) for r in reqs)
    assert [len(c) for c in chunk_requests(reqs, max_requests=100, max_bytes=3 * size)] == [3] * 8 + [1]


def test_minilm_embeddings_equal_transformers_bert_mean_pooled():
    import torch
    from transformers import BertModel

    from pipeline.interpret.embedding import SentenceEncoder, default_model_dir

    enc = SentenceEncoder()
    texts = RIVER[:3] + ["x", OTHER[0] + " " + OTHER[1]]
    ours = enc.encode(texts)
    ref_model = BertModel.from_pretrained(str(default_model_dir())).eval()
    batch = enc.tokenizer.encode_batch(texts)
    ids, mask = torch.tensor([b.ids for b in batch]), torch.tensor([b.attention_mask for b in batch])
    with torch.no_grad():
        h = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = torch.nn.functional.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_claude_judge_through_the_same_batch_machinery(tmp_path, monkeypatch):
    """--task detect: Claude picks the activating sentences of a shuffled mix; balanced accuracy per latent."""
    import re

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)

    def judge(cid, params):
        if cid.startswith("explain"):
            return "succeeded", VERDICT
        body = params["messages"][0]["content"]
        picks = [
            int(n) for n, text in re.findall(r"^(\d+)\. (.*)$", body, re.M) if re.search(r"river|lake", text, re.I)
        ]
        if cid.startswith("detect-1-"):
            picks = picks[:1]  # a worse judge answer for latent 1: one hit, the rest missed
        return "succeeded", f"Thinking...\n{json.dumps({'activating': picks})}"

    top = write_top_sentences(tmp_path / "top", n_latents=2)
    server = FakeBatches(judge, polls_until_end=0)
    try:
        common = dict(out=str(tmp_path / "interp"), base_url=server.url)
        meanings = str(tmp_path / "meanings")
        send_main(SendConfig(top_sentences=str(top), **common))
        retrieve_main(RetrieveConfig(**common))
        parse_main(
            ParseConfig(top_sentences=str(top), browser=False, out=common["out"], meanings=meanings, judge="none")
        )
        send_main(
            SendConfig(top_sentences=str(top), task="detect", meanings=meanings, sentences_per_latent=6, **common)
        )
        retrieve_main(RetrieveConfig(task="detect", **common))
        m = parse_main(
            ParseConfig(top_sentences=str(top), browser=False, out=common["out"], meanings=meanings, judge="none")
        )
    finally:
        server.close()
    doc = json.loads(Path(m["meaning_file"]).read_text())
    scores = {e["latent"]: e["scores"]["claude-balanced-accuracy"] for e in doc["latents"]}
    # 3 held-out activating (the explainer saw the other 9 river sentences) + 3 random silent + 2 hard negatives
    assert scores[0] == 1.0  # all picked right
    assert scores[1] == pytest.approx((1 / 3 + 1.0) / 2)
    assert doc["latents"][0]["score"] == scores[doc["latents"][0]["latent"]]
    assert KEY not in files_text(tmp_path)


def test_concept_explainer_names_the_topic_and_never_reads_the_judges_sentences(tmp_path):
    """A concept phrase plus key words (no token-list template), and the same answer whatever the judge's silent
    sentences say: the explainer never sees what it is scored on."""
    data = open_top_sentences(write_top_sentences(tmp_path / "top", n_latents=1))
    ex = LatentExamples.load(data, "max")
    verdict, _ = parse_verdict(concept_answers(ex, [0], n_train=6)[0])
    meaning = verdict["meaning"]
    assert '"river"' in meaning and '"lake"' in meaning and not meaning.startswith("the tokens"), meaning
    held, negatives = ex.judge_split(0, 6, 6, 6, n_top=6)
    assert (
        ex.hard[0]
        and set(ex.hard[0]) <= set(negatives)
        and held
        and not set(held) & {r["sentence_id"] for r in ex.explainer_rows(0, 6)}
    )
    for sid in negatives:
        ex.sentences[sid] = {**ex.sentences[sid], "text": "The river and the lake and the river bank."}
    for sid in held:
        ex.sentences[sid] = {**ex.sentences[sid], "text": "The committee approved the annual budget."}
    assert parse_verdict(concept_answers(ex, [0], n_train=6)[0])[0] == verdict


@pytest.mark.parametrize(
    "sentences,token,expect",
    [
        ([["In", " 19", "39", " it"], ["By", " 19", "12", "."]], "39", 'the digit "39" in numbers ("1939")'),
        ([["The", " Lor", "ic", "ariidae"], ["A", " ic", "on"]], "ic", 'the word piece "ic" inside words'),
        ([["It", " is", " thought", " to"], ["Once", " thought", " to", " be"]], "thought", '"thought to"'),
        ([["Red", ",", " green"], ["Blue", ",", " white"]], ",", 'the punctuation ","'),
    ],
)
def test_token_patterns_are_said_plainly(sentences, token, expect):
    """A latent firing on one token is described by what that token is: digits, a word piece, a word in its phrase."""
    from pipeline.interpret.concepts import describe_token

    train = [(toks, [1.0 if t.strip().lower() == token else 0.0 for t in toks], "".join(toks)) for toks in sentences]
    assert expect in describe_token(train, token)


def test_rating_scorer_rank_correlation_equals_numpy():
    """The hand-rating scorer's Spearman (ratings 0-2 tie a lot) against numpy: Pearson of tie-averaged ranks."""
    import importlib.util
    import random

    import numpy as np

    def average_ranks(v):
        v = np.asarray(v, float)
        r = np.empty(len(v))
        r[v.argsort(kind="stable")] = np.arange(len(v))
        for u in np.unique(v):
            r[v == u] = r[v == u].mean()
        return r

    spec = importlib.util.spec_from_file_location("meaning_ratings", REPO / "scripts" / "meaning_ratings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = random.Random(0)
    hand = [rng.choice([0, 1, 2]) for _ in range(120)]
    score = [h * 0.1 + rng.random() for h in hand]
    for x, y in ((hand, score), (hand, [round(s, 1) for s in score]), (hand, hand)):
        assert abs(module.spearman(x, y) - np.corrcoef(average_ranks(x), average_ranks(y))[0, 1]) < 1e-9


def test_offline_answers_of_an_earlier_explainer_are_explained_again(tmp_path, monkeypatch):
    """A run from before the concept explainer left n-gram answers in the state: send explains them again instead of
    reporting "nothing new to send" (and the meanings file then names the current explainer)."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    top = write_top_sentences(tmp_path / "top", n_latents=2)
    out = tmp_path / "interp"
    send_main(SendConfig(top_sentences=str(top), out=str(out)))
    for path in (out / "explain" / "results").glob("*.jsonl"):  # as the n-gram explainer wrote them
        path.write_text(path.read_text().replace('"model": "offline-concept"', '"model": "offline-ngram"'))
    again = send_main(SendConfig(top_sentences=str(top), out=str(out)))
    assert again["requests_sent"] == 2 and again["outcome"] == "computed"
    models = {
        line.split('"model": "')[1].split('"')[0]
        for p in (out / "explain" / "results").glob("*.jsonl")
        for line in p.read_text().splitlines()
    }
    assert models == {"offline-concept"}
    assert send_main(SendConfig(top_sentences=str(top), out=str(out)))["requests_sent"] == 0  # now it is current


def test_batch_auroc_equals_the_pairwise_count_with_ties_half():
    import torch

    from pipeline.interpret.concepts import batch_auroc

    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (7, 13), generator=g).float() / 5  # few values: many ties
    neg = torch.randint(0, 6, (7, 29), generator=g).float() / 5
    pairs = [
        (p[:, None] > n[None, :]).double().mean() + 0.5 * (p[:, None] == n[None, :]).double().mean()
        for p, n in zip(pos, neg)
    ]
    torch.testing.assert_close(batch_auroc(pos, neg), torch.stack(pairs).float(), rtol=0, atol=1e-7)
    assert float(batch_auroc(torch.ones(1, 3), torch.zeros(1, 4))) == 1.0
