"""The contracts between stages: what an SAE must be fed travels with it from the capture on; every
stage output has one typed reader (a missing field is one line naming the folder); one lifecycle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capture_activations import main as capture_main
from capture_top_activating_sentences import main as top_main
from llama_3 import PipelineInputError, load_model
from openwebtext_sentences_dataset import main as sentences_main
from pipeline.capture.activations import CaptureOutput
from pipeline.capture.config import CaptureConfig
from pipeline.core.output_folder import OutputFolder, owned_names
from pipeline.preprocessing.config import PreprocessConfig
from pipeline.preprocessing.preprocessed import PreprocessedOutput
from pipeline.sae.config import TrainConfig
from pipeline.sae.formats import export_saelens
from pipeline.sae.model import TopKSae
from pipeline.sentences.config import SentencesConfig
from pipeline.sentences.dataset import SentenceDataset, iter_sentences
from pipeline.steering.session import Session
from pipeline.steering.splice import SteeringEntry, sae_splice
from pipeline.top_sentences.config import TopSentencesConfig
from pipeline.top_sentences.tables import open_top_sentences
from sae_preprocessing import main as preprocess_main
from sae_training import main as train_main

REPO = Path(__file__).resolve().parents[2]
HOOK, MAX_TOKENS = "resid_pre.2", 12


@pytest.fixture(scope="module")
def bos_run(tmp_path_factory, tiny):
    """sentences -> capture with --add-bos (and short truncation) -> preprocessing -> a small SAE."""
    root = tmp_path_factory.mktemp("bos")
    sentences_main(
        SentencesConfig(out=str(root / "s"), max_documents=25, splitter="trained", punkt_train_chars=100_000)
    )
    capture_main(
        CaptureConfig(
            sentences=str(root / "s"),
            out=str(root / "a"),
            model=str(tiny.hf_dir),
            hook_points=[HOOK],
            add_bos=True,
            max_tokens=MAX_TOKENS,
            device="cpu",
            model_dtype="float32",
            storage_dtype="float32",
        )
    )
    preprocess_main(PreprocessConfig(capture=str(root / "a"), out=str(root / "p"), batch_size=64, workers=1))
    train_main(
        TrainConfig(
            data=str(root / "p"),
            out=str(root / "t"),
            n_latents=32,
            k=4,
            batch_size=64,
            device="cpu",
            wandb="disabled",
            eval_sentences=4,
            val_every=10**9,
        )
    )
    return root


def test_the_sae_carries_the_capture_tokenization(bos_run):
    cfg = TopKSae.load(bos_run / "t" / "sae").cfg
    # BOS sinks the attention, so preprocessing excludes no text position; BOS itself is never stored
    assert (cfg.add_bos, cfg.max_tokens, cfg.exclude_first_positions) == (True, MAX_TOKENS, 0)
    assert cfg.tokenization.skip_first_positions == 1 and cfg.tokenization.sequence_tokens == MAX_TOKENS + 1
    run = json.loads((bos_run / "t" / "manifest.json").read_text())
    assert "eval/ce_loss_recovered" in run["spliced_evaluation"]  # the spliced evaluation tokenized as captured


def test_the_sae_records_the_data_it_was_trained_from(bos_run, tiny, tmp_path):
    """Provenance travels forward: the SAE names its preprocessed data, capture and sentences with their
    fingerprints (each equal to what that output's own reader says), so a later stage needs no run folder."""
    trained_on = TopKSae.load(bos_run / "t" / "sae").cfg.trained_on
    pre, cap = PreprocessedOutput.open(bos_run / "p"), CaptureOutput.open(bos_run / "a")
    sentences = SentenceDataset.open(bos_run / "s")
    assert (trained_on.preprocessed, trained_on.preprocessed_fingerprint) == (str(bos_run / "p"), pre.fingerprint)
    assert (trained_on.capture, trained_on.capture_fingerprint) == (str(bos_run / "a"), cap.fingerprint)
    assert (trained_on.sentences, trained_on.sentences_fingerprint) == (str(bos_run / "s"), sentences.fingerprint)
    assert trained_on.capture_sentences == cap.max_sentences
    # the SAE folder copied alone (no training run beside it) still reads its activations from its capture
    shutil.copytree(bos_run / "t" / "sae", tmp_path / "alone")
    manifest = top_main(
        TopSentencesConfig(
            sae=str(tmp_path / "alone"),
            sentences=str(bos_run / "s"),
            out=str(tmp_path / "top"),
            top_n=5,
            device="cpu",
            model_dtype="float32",
            source="capture",
        )
    )
    assert manifest["source"]["capture"] == str(bos_run / "a") and manifest["source"]["model_sentences"] == 0


def test_top_sentences_skip_bos_and_match_brute_force(bos_run, tiny, tmp_path):
    sae_dir = bos_run / "t" / "sae"
    top_main(
        TopSentencesConfig(
            sae=str(sae_dir),
            sentences=str(bos_run / "s"),
            out=str(tmp_path / "top"),
            top_n=5,
            device="cpu",
            model_dtype="float32",
            max_sentences=0,
        )
    )
    res = open_top_sentences(tmp_path / "top")
    lm, sae = load_model(tiny.hf_dir), TopKSae.load(sae_dir)
    texts = {sid: t for part in iter_sentences(bos_run / "s") for sid, t in zip(part["sentence_id"], part["text"])}
    tokens = {r["sentence_id"]: r["tokens"] for r in res.table("sentences").to_pylist()}
    rows = res.table("top_sentences").to_pylist()
    assert rows
    for r in rows[:40]:
        # the reference: BOS + the first MAX_TOKENS text tokens, dense SAE on every position but BOS
        ids = lm.tokenizer.encode(texts[r["sentence_id"]], bos=True)[: MAX_TOKENS + 1]
        pieces = tokens[r["sentence_id"]]
        assert len(pieces) == len(ids) and pieces[0] == lm.tokenizer.decode([lm.tokenizer.bos_id])
        with torch.no_grad():
            acts = lm.model.capture(torch.tensor([ids]), [HOOK])[HOOK][0]
            values, idx = sae.encode(sae.normalize_input(acts.float())[0], dense=True)
        h = torch.zeros(len(ids), sae.cfg.n_latents).scatter(1, idx, values)[:, r["latent"]]
        h[0] = 0  # BOS: never seen by the SAE (a capture with --add-bos stores no BOS row)
        np.testing.assert_allclose(r["token_activations"], h.tolist(), rtol=1e-4, atol=1e-5)
        if r["aggregation"] == "max":
            np.testing.assert_allclose(r["score"], float(h[1:].max()), rtol=1e-4, atol=1e-5)


def test_steering_leaves_bos_alone_and_prompts_start_with_it(bos_run, tiny):
    sae = TopKSae.load(bos_run / "t" / "sae")
    splice = sae_splice(sae, [SteeringEntry(0, "add", 50.0)])
    assert splice.skip_first_positions == 1
    lm = load_model(tiny.hf_dir)
    session = Session.open(str(tiny.hf_dir), str(bos_run / "t" / "sae"), "none", "cpu", "float32")
    (ids,) = session.text_prompts(["The river runs"])
    assert ids[0] == lm.tokenizer.bos_id and ids[1:] == lm.tokenizer.encode("The river runs", bos=False)
    later = "resid_post.3"
    with torch.no_grad():
        clean = lm.model.capture(torch.tensor([ids]), [later])[later][0]
        steered = lm.model.capture(torch.tensor([ids]), [later], splice={HOOK: splice})[later][0]
    torch.testing.assert_close(steered[0], clean[0], rtol=0, atol=0)  # BOS untouched
    assert (steered[1:] - clean[1:]).norm(dim=-1).min() > 1.0  # every text position steered


def test_saelens_export_names_the_capture(bos_run, tmp_path):
    from sae_lens import SAE  # the real package reads the metadata

    sae = TopKSae.load(bos_run / "t" / "sae")
    export_saelens(sae, tmp_path / "lens")
    meta = SAE.load_from_disk(tmp_path / "lens").cfg.metadata
    assert meta.prepend_bos is True and meta.context_size == MAX_TOKENS + 1
    assert list(meta.seqpos_slice) == [1, None]  # BOS is not a position the SAE was trained on
    assert meta.hook_name == "blocks.2.hook_resid_pre" and meta.sae_lens_version
    assert meta.model_name == "hf" and meta.model_identity["config_sha256"] == sae.cfg.model["config_sha256"]
    sae.cfg.hook_point = "resid_post.1"
    export_saelens(sae, tmp_path / "post")
    assert SAE.load_from_disk(tmp_path / "post").cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    sae.cfg.hook_point = "resid_mid.1"
    export_saelens(sae, tmp_path / "mid")
    assert SAE.load_from_disk(tmp_path / "mid").cfg.metadata.hook_name == "blocks.1.hook_resid_mid"
    sae.cfg.hook_point = "ffn_norm.1"
    with pytest.raises(PipelineInputError, match="no hook for the RMSNorm output"):
        export_saelens(sae, tmp_path / "norm")


@pytest.mark.parametrize("edit", ["missing", "renamed"])
def test_a_missing_manifest_field_is_one_line_naming_the_folder(bos_run, tmp_path, edit):
    capture = tmp_path / "capture"
    shutil.copytree(bos_run / "a", capture)
    m = json.loads((capture / "manifest.json").read_text())
    value = m.pop("tokenization")
    if edit == "renamed":
        m["tokenisation"] = value
    (capture / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PipelineInputError, match="has no field 'tokenization.add_bos'") as e:
        preprocess_main(PreprocessConfig(capture=str(capture), out=str(tmp_path / "p")))
    assert str(capture) in str(e.value) and "\n" not in str(e.value)
    proc = subprocess.run(
        [sys.executable, str(REPO / "sae_preprocessing.py"), "--capture", str(capture), "--out", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(capture) in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "q").exists()  # nothing written for a request that was refused


def test_training_retrains_when_its_data_changes_at_the_same_path(bos_run, tmp_path):
    """The request used to hold the data's path where its fingerprint belonged: new data, stale SAE."""
    data, out = tmp_path / "p", tmp_path / "t"
    cfg = dict(data=str(data), out=str(out), n_latents=16, k=2, batch_size=64, device="cpu", wandb="disabled")
    cfg.update(eval_sentences=0, val_every=10**9)
    preprocess_main(PreprocessConfig(capture=str(bos_run / "a"), out=str(data), batch_size=64, seed=0, workers=1))
    first = train_main(TrainConfig(**cfg))
    assert train_main(TrainConfig(**cfg))["outcome"] == "reused"
    preprocess_main(
        PreprocessConfig(capture=str(bos_run / "a"), out=str(data), batch_size=64, seed=1, workers=1, force=True)
    )
    with pytest.raises(PipelineInputError, match="training run made with other settings"):
        train_main(TrainConfig(**cfg))
    again = train_main(TrainConfig(**cfg, force=True))
    assert again["outcome"] == "computed" and again["fingerprint"] != first["fingerprint"]


def test_output_folder_lifecycle(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(out, "thing", owned_names("manifest.json", "data.bin", "_progress.json"), ("_progress.json",))
    assert folder.prepare("A", force=False).state == "fresh"
    (out / "_progress.json").write_text(json.dumps({"fingerprint": "A"}))
    (out / "data.bin").write_bytes(b"partial")
    assert folder.prepare("A", force=False).state == "resume"
    with pytest.raises(PipelineInputError, match="holds a thing made with other settings"):
        folder.prepare("B", force=False)
    (out / "_progress.json").unlink()
    (out / "manifest.json").write_text(json.dumps({"fingerprint": "A", "outcome": "computed"}))
    reused = folder.prepare("A", force=False)
    assert reused.state == "reuse" and json.loads((out / "manifest.json").read_text())["outcome"] == "reused"
    assert folder.prepare("B", force=True).state == "fresh" and sorted(p.name for p in out.iterdir()) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineInputError, match=r"holds other files \(notes.txt\)"):
        folder.prepare("A", force=True)
    assert (out / "notes.txt").read_text() == "mine"  # refused before anything is removed


def test_a_kill_inside_safetensors_save_does_not_block_the_resume(tmp_path):
    """safetensors' save_file writes a ".tmpXXXXXX" beside its target and renames it (Rust's tempfile): a
    SIGKILL at that moment left one in the capture folder, and the resume refused the folder as holding other
    files. It is the stage's own debris: removed when the folder is prepared; other dot-files still refuse."""
    out = tmp_path / "out"
    folder = OutputFolder(
        out, "capture", owned_names("manifest.json", prefixes=("acts-r", "_progress-r")), ("_progress-r*.json",)
    )
    assert folder.prepare("A", force=False).state == "fresh"
    (out / "_progress-r000.json").write_text(json.dumps({"fingerprint": "A"}))
    (out / "acts-r000-00000.safetensors").write_bytes(b"a finished shard")
    (out / ".tmpozCht3").write_bytes(b"half a shard")
    assert folder.prepare("A", force=False).state == "resume"
    assert sorted(p.name for p in out.iterdir()) == ["_progress-r000.json", "acts-r000-00000.safetensors"]
    (out / ".tmp_mine").write_text("not safetensors'")
    with pytest.raises(PipelineInputError, match=r"holds other files \(.tmp_mine\)"):
        folder.prepare("A", force=False)


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run, read with W&B's own protobuf schema. The .wandb file is a
    LevelDB-style log (7-byte header, 32 KiB blocks, records split FULL / FIRST / MIDDLE / LAST)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pieces, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            out.append(record)
    return out


def test_the_wandb_run_has_the_spliced_evaluation_and_the_resolved_config(bos_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "t"
    manifest = train_main(
        TrainConfig(
            data=str(bos_run / "p"),
            out=str(out),
            k=4,
            batch_size=64,
            device="cpu",
            wandb="offline",
            eval_sentences=4,
            val_every=10**9,
        )
    )
    records = wandb_records(out)
    history = {}  # step -> W&B's row (it merges what is logged at one step: the last step and the final row)
    for r in records:
        if r.HasField("history"):
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[row["_step"]] = row
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == sorted({row["step"] for row in rows})
    for row in rows:  # W&B has every metrics.jsonl value, the final row included
        for key, value in row.items():
            if key != "step":
                assert history[row["step"]][key] == pytest.approx(value), key
    spliced = manifest["spliced_evaluation"]
    assert rows[-1]["final"] == 1
    assert rows[-1]["eval/ce_loss_recovered"] == pytest.approx(spliced["eval/ce_loss_recovered"])
    assert history[rows[-1]["step"]]["eval/kl_sae"] == pytest.approx(spliced["eval/kl_sae"])
    [run] = [r.run for r in records if r.HasField("run")]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    sae = TopKSae.load(out / "sae").cfg
    assert config["n_latents"] == sae.n_latents > 0 and config["lr"] > 0  # not the "auto" zeros
    assert config["input_scale"] == pytest.approx(sae.input_scale) and config["hook_point"] == HOOK
    assert config["model"]["config_sha256"] == sae.model["config_sha256"]
