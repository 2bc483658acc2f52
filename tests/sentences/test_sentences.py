"""Sentence dataset: build from every source kind, round trip, resume, rank sharding, length batching."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.sentences.build as build_script
from llama_3 import PipelineInputError
from openwebtext_sentences_dataset import main
from pipeline.sentences.config import SentencesConfig
from pipeline.sentences.dataset import SentenceDataset, SentenceTokenDataset, iter_sentences, length_batches
from pipeline.sentences.splitter import SentenceSplitter
from pipeline.sentences.text_sources import WikiSummariesSource

REPO = Path(__file__).resolve().parents[2]


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def read_all(directory) -> dict[str, list]:
    cols = ("sentence_id", "doc_id", "sentence_index", "char_start", "text", "doc_key", "title", "topic")
    out = {c: [] for c in cols}
    for part in iter_sentences(directory, cols):
        for c in cols:
            out[c] += part[c]
    return out


def cfg(tmp_path, name="out", **kw) -> SentencesConfig:
    kw.setdefault("splitter", "trained")
    kw.setdefault("punkt_train_chars", 300_000)
    return SentencesConfig(out=str(tmp_path / name), **kw)


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """The first 400 embedded Wikipedia summaries, in row groups of 64 sentences."""
    tmp = tmp_path_factory.mktemp("wiki")
    main(cfg(tmp, max_documents=400, row_group_sentences=64, shard_sentences=500))
    return tmp / "out"


def test_round_trip_and_dense_ordered_ids(wiki):
    rows = read_all(wiki)
    n = len(rows["sentence_id"])
    assert rows["sentence_id"] == list(range(n))
    docs = [r for r in WikiSummariesSource().records(10**9)][:400]
    by_doc: dict[int, list[int]] = {}
    for i, d in enumerate(rows["doc_id"]):
        by_doc.setdefault(d, []).append(i)
    assert sorted(by_doc) == list(range(400))  # dense, and every document produced sentences
    assert rows["doc_id"] == sorted(rows["doc_id"])
    for d, idx in by_doc.items():
        doc = docs[d]
        assert [rows["sentence_index"][i] for i in idx] == list(range(len(idx)))
        assert {rows["doc_key"][i] for i in idx} == {doc.key} and {rows["title"][i] for i in idx} == {doc.title}
        assert {rows["topic"][i] for i in idx} == {doc.topic}
        # Concatenating a document's sentences gives back its text, modulo whitespace...
        assert norm(" ".join(rows["text"][i] for i in idx)) == norm(doc.text)
        # ...and each sentence sits exactly at its recorded offset.
        for i in idx:
            assert doc.text[rows["char_start"][i] : rows["char_start"][i] + len(rows["text"][i])] == rows["text"][i]
    m = json.loads((wiki / "manifest.json").read_text())
    assert m["counts"]["sentences"] == n and m["counts"]["documents"] == 400
    assert m["splitter"]["kind"] == "trained-on-corpus" and (wiki / "punkt_params.json").is_file()
    assert len(m["shards"]) > 1  # several shards, each ending at a document boundary
    for s in m["shards"]:
        t = pq.read_table(wiki / s["file"], columns=["doc_id", "sentence_index"])
        assert t.column("sentence_index")[0].as_py() == 0


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_rank_shards_are_disjoint_and_complete(wiki, tiny_model, world_size):
    units = SentenceDataset.open(wiki).units
    assert len(units) > 8
    seen: list[int] = []
    for rank in range(world_size):
        ds = SentenceTokenDataset(wiki, tiny_model.tokenizer, rank=rank, world_size=world_size, max_batch_tokens=512)
        ids = [i for b in ds for i in b.sentence_ids.tolist()]
        assert len(ids) == ds.n_sentences
        seen += ids
    assert sorted(seen) == list(range(sum(u.n_rows for u in units)))


def test_dataloader_workers_split_a_rank_disjointly(wiki, tiny_model):
    from torch.utils.data import DataLoader

    ds = SentenceTokenDataset(wiki, tiny_model.tokenizer, rank=1, world_size=2)
    ids = [i for b in DataLoader(ds, batch_size=None, num_workers=2) for i in b.sentence_ids.tolist()]
    assert sorted(ids) == sorted(i for b in ds for i in b.sentence_ids.tolist())


def test_batches_hold_the_tokenizers_ids_truncated_and_without_bos(wiki, tiny_model):
    tok = tiny_model.tokenizer
    texts = dict(zip(*[read_all(wiki)[c] for c in ("sentence_id", "text")]))
    ds = SentenceTokenDataset(wiki, tok, max_tokens=12, max_batch_tokens=256)
    n_trunc = 0
    for b in ds:
        assert b.tokens.shape[0] * b.tokens.shape[1] <= 256
        for row, sid in enumerate(b.sentence_ids.tolist()):
            ref = tok.encode(texts[sid], bos=False)
            n = int(b.lengths[row])
            assert b.tokens[row, :n].tolist() == ref[:12] and n == min(len(ref), 12)
            assert bool(b.truncated[row]) == (len(ref) > 12)
            assert (b.tokens[row, n:] == tok.pad_id).all()
            n_trunc += len(ref) > 12
    assert ds.stats["truncated_sentences"] == n_trunc > 0
    with_bos = next(iter(SentenceTokenDataset(wiki, tok, add_bos=True)))
    assert (with_bos.tokens[:, 0] == tok.bos_id).all()


def test_length_batching_reduces_padding(wiki, tiny_model):
    fractions = {}
    for sort in (True, False):
        ds = SentenceTokenDataset(wiki, tiny_model.tokenizer, sort_by_length=sort, max_batch_tokens=1024)
        for _ in ds:
            pass
        fractions[sort] = 1 - ds.stats["tokens"] / ds.stats["padded_tokens"]
    assert fractions[True] < 0.5 * fractions[False], fractions


def test_length_batches_respect_budget():
    lengths = [3, 3, 5, 9, 9, 9, 20, 50]
    batches = length_batches(lengths, max_batch_tokens=30, max_batch_size=3)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 30 or len(b) == 1


def test_punkt_fallback_learns_and_handles_abbreviations(tmp_path):
    lines = []
    for i in range(300):  # a corpus in which "Ave." is mostly followed by lower-case words
        lines.append(
            f"The office on Fifth Ave. near the park opened in {1900 + i}. Dr. Smith of the U.S. Navy visited it."
        )
        lines.append(f"Traffic on Park Ave. was heavy that day, number {i}. Everyone went home early.")
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines))
    splitter = SentenceSplitter.train(iter(lines), 10**6)
    assert "ave" in splitter.tokenizer._params.abbrev_types  # learned from this corpus, not a seed
    text = "Dr. Jones met the U.S. ambassador on Madison Ave. near noon. They talked for an hour. Then it rained."
    assert [text[s:e] for s, e in splitter.spans(text)] == [
        "Dr. Jones met the U.S. ambassador on Madison Ave. near noon.",
        "They talked for an hour.",
        "Then it rained.",
    ]
    # The trained parameters survive the JSON cache exactly.
    splitter.save(tmp_path / "p.json")
    again = SentenceSplitter.load(tmp_path / "p.json")
    assert again.spans(text) == splitter.spans(text)


def test_local_txt_jsonl_parquet_with_bad_input_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(
        b"First doc. It has two sentences.\n\nSecond doc here.\n\n   \n\nBad bytes \xff\xfe here.\n\n"
        + b"x" * 5000
        + b".\n"
    )
    (src / "b.txt").write_bytes(b"")
    (src / "c.jsonl").write_text(
        json.dumps({"text": "From JSON. Really.", "title": "T"}) + "\n{not json\n" + json.dumps({"text": "   "}) + "\n"
    )
    pq.write_table(
        pa.table({"text": ["Parquet row one. And two.", "Row two."], "topic": ["Sci", None]}), src / "d.parquet"
    )
    m = main(cfg(tmp_path, input=[str(src)], max_document_chars=1000))
    skipped = m["counts"]["skipped"]
    assert skipped == {
        "invalid_utf8": 1,
        "document_too_long": 1,
        "empty_file": 1,
        "invalid_json": 1,
        "empty_document": 1,
    }
    rows = read_all(tmp_path / "out")
    assert rows["text"] == [
        "First doc.",
        "It has two sentences.",
        "Second doc here.",
        "From JSON.",
        "Really.",
        "Parquet row one.",
        "And two.",
        "Row two.",
    ]
    assert rows["doc_id"] == [0, 0, 1, 2, 2, 3, 3, 4]
    assert rows["title"][3] == "T" and rows["topic"][5] == "Sci" and rows["topic"][7] is None
    assert m["counts"]["records_read"] == 4 + 1 + 3 + 2  # a.txt blocks + empty b.txt + c.jsonl lines + d.parquet rows


def test_hf_datasets_source_on_a_local_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "owt_like" / "data"
    data.mkdir(parents=True)
    with open(data / "train.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"body": f"Article {i} starts. It continues with detail {i}.", "url": f"u{i}"}) + "\n")
    m = main(cfg(tmp_path, hf_dataset=str(tmp_path / "owt_like"), text_column="body"))
    rows = read_all(tmp_path / "out")
    assert m["counts"]["documents"] == 20 and len(rows["text"]) == 40
    assert rows["text"][:2] == ["Article 0 starts.", "It continues with detail 0."]
    assert rows["doc_key"][0].endswith(":train:0")
    with pytest.raises(PipelineInputError, match="--text-column 'text': not in dataset"):
        main(cfg(tmp_path, name="out2", hf_dataset=str(tmp_path / "owt_like")))
    with pytest.raises(PipelineInputError, match="--hf-dataset .*cannot be loaded"):
        main(cfg(tmp_path, name="out3", hf_dataset=str(tmp_path / "missing")))


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    kw = dict(max_documents=150, shard_sentences=100, row_group_sentences=32)
    main(cfg(tmp_path, name="clean", **kw))
    real_write = build_script._write_shard
    calls = {"n": 0}

    def dying_write(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # dies mid-build, after two complete shards
        return real_write(*a, **k)

    monkeypatch.setattr(build_script, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        main(cfg(tmp_path, name="resumed", **kw))
    out = tmp_path / "resumed"
    assert not (out / "manifest.json").exists() and (out / "_progress.json").exists()
    assert not list(out.glob("*.tmp"))
    with pytest.raises(PipelineInputError, match="missing"):  # readers refuse the unfinished dataset
        SentenceDataset.open(out)
    monkeypatch.setattr(build_script, "_write_shard", real_write)
    main(cfg(tmp_path, name="resumed", **kw))
    assert read_all(out) == read_all(tmp_path / "clean")
    clean, resumed = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("clean", "resumed"))
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert resumed["counts"] == clean["counts"]


def test_output_folder_guards(tmp_path):
    main(cfg(tmp_path, max_documents=20))
    again = main(cfg(tmp_path, max_documents=20))  # same settings: reused, not rebuilt
    assert again["counts"]["documents"] == 20
    with pytest.raises(PipelineInputError, match="made with other settings"):
        main(cfg(tmp_path, max_documents=30))
    assert main(cfg(tmp_path, max_documents=30, force=True))["counts"]["documents"] == 30
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("mine")
    with pytest.raises(PipelineInputError, match="holds other files"):
        main(cfg(tmp_path, name="other", max_documents=5))
    with pytest.raises(PipelineInputError, match="--input .*no such file"):
        main(cfg(tmp_path, name="x", input=[str(tmp_path / "nope.txt")]))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(PipelineInputError, match="has no text|no sentences"):
        main(cfg(tmp_path, name="y", input=[str(tmp_path / "empty.txt")]))
    assert not (tmp_path / "y" / "manifest.json").exists()


def test_cli_missing_jsonl_column_is_one_line(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "openwebtext_sentences_dataset.py",
            "--input",
            str(tmp_path / "c.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--splitter",
            "trained",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path / 'c.jsonl'}:1: no 'text' field (has: body); set --text-column"
    )
