"""The sentences stage: documents from a text source, split into sentences, written as parquet shards of fixed row
groups, resumable.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import (
    MANIFEST_NAME,
    atomic_path,
    fingerprint,
    make_manifest,
    sha256_file,
    write_json_atomic,
)
from pipeline.core.output_folder import OutputFolder, config_request, owned_names
from pipeline.sentences.config import SentencesConfig
from pipeline.sentences.dataset import KIND, SCHEMA, shard_filename
from pipeline.sentences.splitter import SentenceSplitter
from pipeline.sentences.text_sources import Document, HFDatasetSource, LocalFilesSource, TextSource, WikiSummariesSource

PROGRESS_NAME = "_progress.json"


PUNKT_NAME = "punkt_params.json"


def make_source(cfg: SentencesConfig) -> TextSource:
    if cfg.input and cfg.hf_dataset:
        raise PipelineInputError("--input and --hf-dataset are exclusive")
    if cfg.hf_dataset:
        return HFDatasetSource(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.text_column, cfg.title_column)
    if cfg.input:
        return LocalFilesSource(cfg.input, cfg.text_column, cfg.title_column)
    return WikiSummariesSource()


def get_splitter(cfg: SentencesConfig, source: TextSource, out: Path) -> SentenceSplitter:
    """Pretrained English Punkt when installed (and allowed), else cached or freshly trained parameters."""
    if cfg.splitter != "trained":
        pre = SentenceSplitter.pretrained_english()
        if pre is not None:
            return pre
        if cfg.splitter == "pretrained":
            raise PipelineInputError(
                "--splitter pretrained: NLTK's punkt_tab English data is not installed (nothing is downloaded)"
            )
    cache = out / PUNKT_NAME
    if cache.is_file():
        return SentenceSplitter.load(cache)
    texts = (r.text for r in source.records(cfg.max_document_chars) if isinstance(r, Document))
    t = time.perf_counter()
    try:
        splitter = SentenceSplitter.train(texts, cfg.punkt_train_chars)
    except PipelineInputError as e:
        if "no text" not in str(e):
            raise
        where = (
            f"--input {' '.join(cfg.input)}"
            if cfg.input
            else f"--hf-dataset {cfg.hf_dataset}"
            if cfg.hf_dataset
            else "the corpus"
        )
        raise PipelineInputError(f"{where}: {e}") from None  # name the source the user gave
    splitter.info["train_seconds"] = round(time.perf_counter() - t, 2)
    splitter.save(cache)
    return splitter


def output_folder(cfg: SentencesConfig) -> OutputFolder:
    return OutputFolder(
        Path(cfg.out),
        "sentence dataset",
        owned_names(MANIFEST_NAME, PROGRESS_NAME, PUNKT_NAME, prefixes=("sentences-", ".sentences-")),
        progress=(PROGRESS_NAME,),
    )


def _write_shard(out: Path, index: int, columns: dict[str, list], row_group_sentences: int) -> dict:
    """Write one shard atomically: a shard is either complete or absent."""
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    name = shard_filename(index)
    with atomic_path(out / name) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_sentences, compression="zstd")
    return {
        "file": name,
        "rows": table.num_rows,
        "first_sentence_id": columns["sentence_id"][0],
        "sha256": sha256_file(out / name),
        "bytes": (out / name).stat().st_size,
    }


def _empty_columns() -> dict[str, list]:
    return {name: [] for name in SCHEMA.names}


def build(cfg: SentencesConfig) -> dict:
    out = Path(cfg.out)
    for name in ("shard_sentences", "row_group_sentences", "max_document_chars", "punkt_train_chars"):
        if getattr(cfg, name) < 1:
            raise PipelineInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    source = make_source(cfg)
    fp = fingerprint({"source": source.describe(), **config_request(cfg)})
    prepared = output_folder(cfg).prepare(fp, cfg.force)
    if prepared.state == "reuse":
        m = prepared.manifest
        print(f"sentence dataset already built: {out} ({m['counts']['sentences']} sentences); --force rebuilds")
        return m
    splitter = get_splitter(cfg, source, out)
    state = (json.loads((out / PROGRESS_NAME).read_text()) if prepared.state == "resume" else None) or {
        "fingerprint": fp,
        "records_consumed": 0,
        "documents": 0,
        "sentences": 0,
        "characters": 0,
        "skipped": {},
        "shards": [],
        "seconds": 0.0,
    }
    # A crash can leave a renamed shard the progress file never recorded, and temp files: drop them.
    known = {s["file"] for s in state["shards"]}
    for p in out.iterdir():
        if (p.name.startswith("sentences-") and p.name not in known) or p.name.endswith(".tmp"):
            p.unlink()

    skipped = Counter(state["skipped"])
    columns = _empty_columns()
    docs_done, records_done = state["documents"], state["records_consumed"]
    sentence_id, t0 = state["sentences"], time.perf_counter() - state["seconds"]
    resumed_at = records_done
    bar = tqdm(desc="documents", unit="doc", initial=docs_done, dynamic_ncols=True, smoothing=0.1)

    def checkpoint() -> None:
        nonlocal columns
        if columns["sentence_id"]:
            state["shards"].append(_write_shard(out, len(state["shards"]), columns, cfg.row_group_sentences))
        columns = _empty_columns()
        state.update(
            records_consumed=records_done,
            documents=docs_done,
            sentences=sentence_id,
            skipped=dict(skipped),
            seconds=time.perf_counter() - t0,
        )
        write_json_atomic(out / PROGRESS_NAME, state)

    for i, rec in enumerate(source.records(cfg.max_document_chars)):
        if i < resumed_at:
            continue
        if cfg.max_documents and docs_done >= cfg.max_documents:
            break
        records_done = i + 1
        if not isinstance(rec, Document):
            skipped[rec.reason] += 1
            continue
        spans = splitter.spans(rec.text)
        title = None if rec.title is None else str(rec.title)
        topic = None if rec.topic is None else str(rec.topic)
        for j, (s, e) in enumerate(spans):
            columns["sentence_id"].append(sentence_id)
            columns["doc_id"].append(docs_done)
            columns["sentence_index"].append(j)
            columns["char_start"].append(s)
            columns["text"].append(rec.text[s:e])
            columns["doc_key"].append(rec.key)
            columns["title"].append(title)
            columns["topic"].append(topic)
            sentence_id += 1
        state["characters"] += len(rec.text)
        docs_done += 1
        bar.update(1)
        if docs_done % 500 == 0:
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(
                f"{sentence_id} sentences, {sentence_id / max(elapsed, 1e-9):.0f} sentences/s", refresh=False
            )
        if len(columns["sentence_id"]) >= cfg.shard_sentences:
            checkpoint()
    checkpoint()
    bar.close()
    if sentence_id == 0:
        raise PipelineInputError(
            f"the source produced no sentences ({dict(skipped) or 'no documents'}); nothing written"
        )

    elapsed = time.perf_counter() - t0
    manifest = make_manifest(
        KIND,
        config=asdict(cfg),
        inputs={"source": source.describe()},
        counts={
            "records_read": records_done,
            "documents": docs_done,
            "sentences": sentence_id,
            "characters": state["characters"],
            "skipped": dict(skipped),
        },
        fingerprint=fp,
        splitter=splitter.describe(),
        schema=[f"{f.name}: {f.type}" for f in SCHEMA],
        shards=state["shards"],
        throughput={
            "seconds": round(elapsed, 2),
            "documents_per_s": round(docs_done / elapsed, 1),
            "sentences_per_s": round(sentence_id / elapsed, 1),
        },
    )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    print(
        f"{out}: {docs_done} documents -> {sentence_id} sentences in {len(state['shards'])} shard(s), "
        f"{sentence_id / elapsed:.0f} sentences/s; skipped {dict(skipped) or 'nothing'}"
    )
    return manifest
