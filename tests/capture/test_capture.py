"""Activation capture: exact activations per (sentence, position), torchrun ranks, SIGKILL + resume, bad input."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import pipeline.capture.activations as activations_mod
from capture_activations import main as capture_main
from llama_3 import PipelineInputError, load_model
from openwebtext_sentences_dataset import main as sentences_main
from pipeline.capture.activations import CaptureOutput, load_shard, sentence_rows
from pipeline.capture.config import CaptureConfig
from pipeline.sentences.config import SentencesConfig
from pipeline.sentences.dataset import iter_sentences
from tests.collective_log import assert_ranks_agree, collective_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    """~300 real sentences (first 90 wiki summaries) in row groups of 32: many units for ranks."""
    out = tmp_path_factory.mktemp("sent") / "s"
    sentences_main(
        SentencesConfig(
            out=str(out), max_documents=90, row_group_sentences=32, splitter="trained", punkt_train_chars=200_000
        )
    )
    return out


def texts_of(directory) -> dict[int, str]:
    out = {}
    for part in iter_sentences(directory):
        out.update(zip(part["sentence_id"], part["text"]))
    return out


def read_capture(directory) -> tuple[dict, dict[tuple[int, int], dict[str, torch.Tensor]], dict[tuple[int, int], int]]:
    """{(sentence_id, position): {hook: activation}} and {(sentence_id, position): token id}; fails on duplicates."""
    capture = CaptureOutput.open(directory)
    manifest = capture.manifest
    rows, toks = {}, {}
    for p in capture.shard_paths:
        shard = load_shard(p)
        for sid, pos0, a, b in sentence_rows(shard):
            for k, r in enumerate(range(a, b)):
                key = (sid, pos0 + k)
                assert key not in rows, f"{key} stored twice"
                rows[key] = {h: shard[f"act.{h}"][r] for h in manifest["hook_points"]}
                toks[key] = int(shard["token_ids"][r])
    return manifest, rows, toks


def base_cfg(tmp_path, tiny, sentences, **kw) -> CaptureConfig:
    kw.setdefault("model_dtype", "float32")
    kw.setdefault("storage_dtype", "float32")
    return CaptureConfig(
        sentences=str(sentences), out=str(tmp_path / kw.pop("name", "acts")), model=str(tiny.hf_dir), device="cpu", **kw
    )


def test_captured_activations_equal_reference_hidden_states(tmp_path, tiny, sentences):
    """Every stored row equals transformers' hidden state for that sentence and position, truncation included."""
    cfg = base_cfg(
        tmp_path,
        tiny,
        sentences,
        hook_points=["resid_pre.2", "attn_norm.3"],
        max_tokens=10,
        shard_tokens=97,
        max_batch_tokens=200,
    )
    manifest = capture_main(cfg)
    _, rows, toks = read_capture(cfg.out)
    tok = load_model(tiny.hf_dir).tokenizer
    texts = texts_of(sentences)
    norm_out = {}
    handle = tiny.reference.model.layers[3].input_layernorm.register_forward_hook(
        lambda m, i, o: norm_out.__setitem__("x", o)
    )
    n_truncated, n_rows = 0, 0
    try:
        for sid, text in texts.items():
            ids = tok.encode(text, bos=False)
            n_truncated += len(ids) > 10
            ids = ids[:10]
            with torch.no_grad():
                hs = tiny.reference(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for pos, t in enumerate(ids):
                got = rows[(sid, pos)]
                assert toks[(sid, pos)] == t
                torch.testing.assert_close(got["resid_pre.2"], hs[2][0, pos], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got["attn_norm.3"], norm_out["x"][0, pos], rtol=1e-5, atol=1e-5)
                n_rows += 1
    finally:
        handle.remove()
    assert n_rows == len(rows) == manifest["counts"]["tokens"]  # nothing extra stored (no padding)
    assert manifest["counts"]["truncated_sentences"] == n_truncated > 0
    assert len(manifest["shards"]) > 3 and all(s["n_tokens"] == 97 for s in manifest["shards"][:-1])
    assert manifest["hook_points"] == ["resid_pre.2", "attn_norm.3"] and manifest["d_model"] == 64
    assert manifest["tokenizer"]["sha256"] == tok.fingerprint() and manifest["inputs"]["model"]["config_sha256"]


def test_batch_size_changes_no_stored_row_beyond_rounding(tmp_path, tiny, sentences):
    """--max-batch-tokens only regroups sentences into forwards (0, auto: 2,048 on CPU, where the kernels
    run fastest): the same rows, tokens and positions are stored, with values equal up to the rounding
    of different matmul shapes; the manifest records what auto became."""
    capture_main(base_cfg(tmp_path, tiny, sentences, name="auto", max_batch_tokens=0))
    capture_main(base_cfg(tmp_path, tiny, sentences, name="big", max_batch_tokens=8192))
    (m_auto, rows_auto, toks_auto), (_, rows_big, toks_big) = (
        read_capture(tmp_path / "auto"),
        read_capture(tmp_path / "big"),
    )
    assert m_auto["config"]["max_batch_tokens"] == 0 and toks_auto == toks_big and rows_auto.keys() == rows_big.keys()
    for hook in m_auto["hook_points"]:
        a = torch.stack([rows_auto[key][hook] for key in rows_auto])  # [tokens, d]
        b = torch.stack([rows_big[key][hook] for key in rows_auto])
        # fp32 rounding of other matmul shapes, relative to the activations' scale (ISA-independent bound)
        assert ((a - b).norm() / b.norm()).item() < 1e-5 and (a - b).abs().max() < 1e-4 * b.abs().max(), hook
    assert m_auto["fingerprint"] != CaptureOutput.open(tmp_path / "big").fingerprint  # auto resolved to 2,048 here


def test_bos_position_is_not_stored(tmp_path, tiny, sentences):
    cfg = base_cfg(tmp_path, tiny, sentences, hook_points=["resid_post.1"], add_bos=True, max_sentences=20)
    capture_main(cfg)
    _, rows, _ = read_capture(cfg.out)
    tok = load_model(tiny.hf_dir).tokenizer
    for sid, text in list(texts_of(sentences).items())[:20]:
        ids = tok.encode(text, bos=True)[: 192 + 1]  # max_tokens counts text tokens; BOS comes on top
        with torch.no_grad():
            hs = tiny.reference(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
        assert (sid, len(ids) - 1) not in rows and (sid, len(ids) - 2) in rows
        for pos in range(len(ids) - 1):
            # fp32 sums in another order than transformers: tolerance relative to the stream's scale
            torch.testing.assert_close(
                rows[(sid, pos)]["resid_post.1"], hs[pos + 1], rtol=1e-5, atol=1e-5 * hs.abs().max().item()
            )


def run_capture_cli(args: list[str], torchrun: int = 0, env_extra: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        if torchrun
        else [sys.executable]
    )
    return subprocess.Popen(
        cmd + ["capture_activations.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_two_rank_gloo_torchrun_equals_one_process(tmp_path, tiny, sentences):
    common = [
        "--sentences",
        str(sentences),
        "--model",
        str(tiny.hf_dir),
        "--device",
        "cpu",
        "--model-dtype",
        "float32",
        "--storage-dtype",
        "float32",
        "--shard-tokens",
        "211",
        "--hook-points",
        "resid_pre.3",
    ]
    one = run_capture_cli(common + ["--out", str(tmp_path / "one")])
    logs = tmp_path / "collectives"  # held to NCCL's rules; both ranks run the same collectives
    two = run_capture_cli(common + ["--out", str(tmp_path / "two")], torchrun=2, env_extra=collective_env(logs))
    for p in (one, two):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    assert_ranks_agree(logs, 2)
    m1, rows1, toks1 = read_capture(tmp_path / "one")
    m2, rows2, toks2 = read_capture(tmp_path / "two")
    assert m2["world_size"] == 2 and {s["rank"] for s in m2["shards"]} == {0, 1}
    assert rows1.keys() == rows2.keys() and toks1 == toks2
    for key in rows1:
        assert torch.equal(rows1[key]["resid_pre.3"], rows2[key]["resid_pre.3"]), key


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_stores_every_sentence_once(tmp_path, tiny, sentences):
    args = [
        "--sentences",
        str(sentences),
        "--model",
        str(tiny.hf_dir),
        "--device",
        "cpu",
        "--model-dtype",
        "float32",
        "--storage-dtype",
        "float32",
        "--shard-tokens",
        "50",
        "--max-tokens",
        "32",
        "--max-batch-tokens",
        "64",
        "--hook-points",
        "resid_pre.2",
    ]
    clean = run_capture_cli(args + ["--out", str(tmp_path / "clean")])
    assert clean.wait(timeout=300) == 0
    out = tmp_path / "killed"
    # Slow the forward a little so the kill lands mid-run, after some shards are complete.
    victim = run_capture_cli(args + ["--out", str(out)], env_extra={"PIPELINE_FAULTS": "capture.batch=sleep:0.02"})
    deadline = time.time() + 120
    while len(list(out.glob("acts-r000-*.safetensors"))) < 5 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert victim.poll() is None, "capture finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "manifest.json").exists()
    resumed = run_capture_cli(args + ["--out", str(out)])
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    m_clean, rows_clean, _ = read_capture(tmp_path / "clean")
    m_res, rows_res, _ = read_capture(out)
    assert (
        rows_res.keys() == rows_clean.keys()
    )  # every (sentence, position) exactly once (read_capture checks duplicates)
    for key in rows_clean:
        assert torch.equal(rows_res[key]["resid_pre.2"], rows_clean[key]["resid_pre.2"])
    assert (
        m_res["counts"]["tokens"] == m_clean["counts"]["tokens"]
        and m_res["throughput"]["tokens_this_run"] < m_clean["counts"]["tokens"]
    )
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith("_progress")]


def test_bad_inputs(tmp_path, tiny, sentences):
    with pytest.raises(PipelineInputError, match=r"--hook-points 'resid_pre.9': layer 9 is out of range"):
        capture_main(base_cfg(tmp_path, tiny, sentences, hook_points=["resid_pre.9"]))
    with pytest.raises(PipelineInputError, match="expected <kind>.<layer>"):
        capture_main(base_cfg(tmp_path, tiny, sentences, hook_points=["mlp_in.1"]))
    capture_main(base_cfg(tmp_path, tiny, sentences, max_sentences=10))
    again = capture_main(base_cfg(tmp_path, tiny, sentences, max_sentences=10))  # reused
    assert again["counts"]["sentences"] == 10
    with pytest.raises(PipelineInputError, match="holds a capture made with other settings"):
        capture_main(base_cfg(tmp_path, tiny, sentences, max_sentences=11))
    assert capture_main(base_cfg(tmp_path, tiny, sentences, max_sentences=11, force=True))["counts"]["sentences"] == 11
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.bin").write_bytes(b"1")
    with pytest.raises(PipelineInputError, match="holds other files"):
        capture_main(base_cfg(tmp_path, tiny, sentences, name="foreign"))
    with pytest.raises(PipelineInputError, match="missing"):
        capture_main(CaptureConfig(sentences=str(tmp_path), out=str(tmp_path / "z"), model=str(tiny.hf_dir)))


def test_disk_full_leaves_no_partial_shard(tmp_path, tiny, sentences, monkeypatch):
    real = activations_mod.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(activations_mod, "save_file", full_disk)
    cfg = base_cfg(tmp_path, tiny, sentences, shard_tokens=100, max_sentences=40)
    with pytest.raises(PipelineInputError, match="disk full"):
        capture_main(cfg)
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == ["_progress-r000.json", "acts-r000-00000.safetensors"]
    monkeypatch.setattr(activations_mod, "save_file", real)
    capture_main(cfg)  # resumes after the one complete shard
    _, rows, _ = read_capture(out)
    full = base_cfg(tmp_path, tiny, sentences, name="full", shard_tokens=100, max_sentences=40)
    capture_main(full)
    _, rows_full, _ = read_capture(full.out)
    assert rows.keys() == rows_full.keys()


def test_the_shard_writer_thread_casts_nothing(tmp_path, monkeypatch):
    """The bf16 cast happens on the caller's thread: a torch op on the writer thread starts a second OpenMP
    team that spins on the cores the next forward needs (the capture stage ran at 84% of its own forward)."""
    threads = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    shards = []
    writer = activations_mod.ShardWriter(tmp_path, 0, ["resid_pre.1"], 8, torch.bfloat16, 16, 0, shards.append)
    x = torch.randn(20, 8)
    writer.put(activations_mod.TokenChunk({"resid_pre.1": x}, torch.arange(20), [0, 1], [0, 0], [12, 8]))
    writer.close()
    assert "shard-writer" not in threads and threads
    stored = torch.cat([load_shard(tmp_path / s["file"])["act.resid_pre.1"] for s in shards])
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, real_to(x, torch.bfloat16))
