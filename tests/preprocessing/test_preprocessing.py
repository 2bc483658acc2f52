"""Preprocessing: exact float64 statistics, every token exactly once, worker-count independence, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_3 import PipelineInputError
from pipeline.capture.activations import KIND as CAPTURE_KIND
from pipeline.capture.activations import ShardWriter, TokenChunk
from pipeline.core.manifest import make_manifest, write_json_atomic
from pipeline.preprocessing.config import PreprocessConfig
from pipeline.preprocessing.preprocessed import Moments, PreprocessedOutput
from sae_preprocessing import main

REPO = Path(__file__).resolve().parents[2]

D = 24
HOOK = "resid_pre.3"


def fake_capture(
    directory: Path, seed: int = 0, n_sentences: int = 300, shard_tokens: int = 211, dtype=torch.float32, sinks=()
):
    """A capture folder written by the real ShardWriter from random data with a large offset (hard for naive
    variance); the (sentence, position) rows in `sinks` are massive activations (x 60)."""
    directory.mkdir(parents=True)
    g = np.random.default_rng(seed)
    shards: list[dict] = []
    writer = ShardWriter(directory, 0, [HOOK], D, dtype, shard_tokens, 0, shards.append)
    truth = {}
    for sid in range(n_sentences):
        n = int(g.integers(1, 40))
        x = (1000.0 + 3.0 * g.standard_normal((n, D)) * g.uniform(0.5, 2.0, D)).astype(np.float32)
        x[0] *= 50  # an attention-sink-like first token
        for s, p in sinks:
            if s == sid and p < n:
                x[p] *= 60
        t = torch.from_numpy(x).to(dtype)
        for p in range(n):
            truth[(sid, p)] = t[p].float().numpy()
        writer.put(TokenChunk({HOOK: t}, torch.arange(n), [sid], [0], [n]))
    writer.close()
    total = sum(s["n_tokens"] for s in shards)
    m = make_manifest(
        CAPTURE_KIND,
        config={},
        inputs={"model": {"path": "fake"}, "sentences": {"path": "fake", "fingerprint": "fake"}},
        counts={"tokens": total, "sentences": n_sentences},
        fingerprint=f"fake-{seed}",
        tokenization={"add_bos": False, "max_tokens": 40},
        selection={"max_sentences": 0},
        tokenizer={"sha256": "fake"},
        hook_points=[HOOK],
        d_model=D,
        storage_dtype=str(dtype),
        model_dtype="torch.float32",
        shards=[{**s, "rank": 0} for s in shards],
    )
    write_json_atomic(directory / "manifest.json", m)
    return truth


def run(tmp_path, capture, name, **kw) -> tuple[dict, dict]:
    cfg = PreprocessConfig(capture=str(capture), out=str(tmp_path / name), **kw)
    main(cfg)
    data = PreprocessedOutput.open(cfg.out)
    return data.manifest, data.stats


@pytest.mark.parametrize("workers", [1, 3])
def test_stats_equal_numpy_two_pass_float64(tmp_path, workers):
    truth = fake_capture(tmp_path / "cap", shard_tokens=97)
    _, stats = run(
        tmp_path,
        tmp_path / "cap",
        "pp",
        workers=workers,
        val_fraction=0.0,
        exclude_first_positions=0,
        sink_norm_ratio=0.0,  # every token: no sink rule
    )
    x = np.stack(list(truth.values())).astype(np.float64)
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)  # numpy two-pass, float64
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-10)
    np.testing.assert_allclose(stats["mean_sq_norm"], (x * x).sum(1).mean(), rtol=1e-10)
    assert stats["count"] == len(x)


def test_moments_merge_is_exact_for_uneven_chunks():
    g = np.random.default_rng(1)
    x = 1e4 + g.standard_normal((1000, 5))
    cuts = [0, 1, 7, 300, 301, 999, 1000]
    m = Moments.empty(5)
    for a, b in zip(cuts, cuts[1:]):
        m = m.merge(Moments.of(x[a:b]))
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var, x.var(0), rtol=1e-10)


def test_every_token_once_sentences_split_cleanly_and_shuffled(tmp_path):
    truth = fake_capture(tmp_path / "cap", dtype=torch.bfloat16)
    manifest, stats = run(tmp_path, tmp_path / "cap", "pp", workers=2, val_fraction=0.2, batch_size=64)
    out = tmp_path / "pp"
    train_idx, val_idx = np.load(out / "train_index.npy"), np.load(out / "val_index.npy")
    train = PreprocessedOutput.open(out).activations("train").float().numpy()
    val = PreprocessedOutput.open(out).activations("val").float().numpy()
    keys = [tuple(k) for k in train_idx.tolist()] + [tuple(k) for k in val_idx.tolist()]
    excluded = {k for k in truth if k[1] == 0}  # the policy: the sink position of BOS-less sentences
    assert len(keys) == len(set(keys))  # nothing twice
    assert set(keys) | excluded == set(truth) and not set(keys) & excluded  # nothing lost
    for rows, idx in ((train, train_idx), (val, val_idx)):
        for r, (s, p) in zip(rows, idx.tolist()):
            np.testing.assert_array_equal(r, truth[(s, p)])
    c = manifest["counts"]
    assert c["train_tokens"] + c["val_tokens"] + c["excluded_tokens"] == c["captured_tokens"] == len(truth)
    assert c["train_batches"] == -(-c["train_tokens"] // 64) and 0 < c["last_batch_size"] <= 64
    val_sents = set(np.load(out / "val_sentence_ids.npy").tolist())
    assert val_sents == {s for s, _ in val_idx.tolist()}
    assert not val_sents & {s for s, _ in train_idx.tolist()}
    assert 0.1 < len(val_sents) / 300 < 0.3
    # Shuffled: a 64-row batch mixes many sentences, unlike capture order.
    assert len({s for s, _ in train_idx[:64].tolist()}) > 40
    assert manifest["massive_activation_policy"]["excluded_share_of_squared_norm"] > 0.5
    # Stats cover exactly the training rows.
    np.testing.assert_allclose(stats["mean"], train.astype(np.float64).mean(0), rtol=1e-9)


def test_massive_activations_are_excluded_wherever_they_stand(tmp_path):
    """Tokens above 10x the median norm (of the tokens the position rule keeps) leave the data like the first
    position; the threshold travels in the tokenization, the counts in the manifest."""
    sinks = {(3, 1), (10, 2), (50, 5), (120, 1), (299, 3), (7, 0)}  # (7, 0): excluded by position already
    truth = fake_capture(tmp_path / "cap", sinks=sinks)
    manifest, stats = run(tmp_path, tmp_path / "cap", "pp", workers=2, val_fraction=0.2, batch_size=64)
    out = PreprocessedOutput.open(tmp_path / "pp")
    by_position = {k: v for k, v in truth.items() if k[1] >= 1}
    median = np.median([np.linalg.norm(v) for v in by_position.values()])
    expected = {k for k, v in by_position.items() if np.linalg.norm(v) > 10 * median}
    assert expected == {k for k in sinks if k[1] >= 1 and k in truth}  # the planted ones, nothing else
    assert out.tokenization.sink_norm == pytest.approx(10 * median, rel=1e-5)
    keys = {tuple(k) for name in ("train_index", "val_index") for k in np.load(tmp_path / "pp" / f"{name}.npy")}
    assert keys == set(by_position) - expected
    policy = manifest["massive_activation_policy"]
    assert policy["sink_tokens"] == manifest["counts"]["sink_tokens"] == len(expected)
    assert manifest["counts"]["excluded_tokens"] == len(truth) - len(by_position) + len(expected)
    train = out.activations("train").double().numpy()
    np.testing.assert_allclose(stats["mean_sq_norm"], (train * train).sum(1).mean(), rtol=1e-9)
    # off at a hook point outside the residual stream (a transcoder's folders must keep the same rows)
    assert PreprocessConfig().sink_norm_ratio == -1
    manifest, _ = run(tmp_path, tmp_path / "cap", "pp_off", sink_norm_ratio=0.0)
    assert (
        manifest["counts"]["sink_tokens"] == 0
        and PreprocessedOutput.open(tmp_path / "pp_off").tokenization.sink_norm == 0
    )


def test_output_does_not_depend_on_worker_count(tmp_path):
    fake_capture(tmp_path / "cap", dtype=torch.bfloat16)
    run(tmp_path, tmp_path / "cap", "w1", workers=1, seed=5)
    run(tmp_path, tmp_path / "cap", "w3", workers=3, seed=5)
    for name in (
        "train_acts.npy",
        "train_index.npy",
        "val_acts.npy",
        "val_index.npy",
        "val_sentence_ids.npy",
        "stats.json",
    ):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes(), name
    run(tmp_path, tmp_path / "cap", "s6", workers=2, seed=6)
    assert (tmp_path / "w1" / "train_index.npy").read_bytes() != (tmp_path / "s6" / "train_index.npy").read_bytes()


def test_bad_inputs(tmp_path):
    fake_capture(tmp_path / "cap")
    cap = tmp_path / "cap"
    shard = sorted(cap.glob("acts-*.safetensors"))[1]
    good = shard.read_bytes()
    shard.write_bytes(good[:-10] + bytes(10))
    with pytest.raises(PipelineInputError, match="checksum differs"):
        run(tmp_path, cap, "a")
    shard.unlink()
    with pytest.raises(PipelineInputError, match="missing"):
        run(tmp_path, cap, "b")
    shard.write_bytes(good)
    fake_capture(tmp_path / "other", seed=1)
    stray = sorted((tmp_path / "other").glob("acts-*.safetensors"))[0]
    (cap / "acts-r001-00000.safetensors").write_bytes(stray.read_bytes())
    with pytest.raises(PipelineInputError, match="not in its manifest"):
        run(tmp_path, cap, "c")
    (cap / "acts-r001-00000.safetensors").unlink()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(PipelineInputError, match="holds other files"):
        run(tmp_path, cap, "busy")
    with pytest.raises(PipelineInputError, match="not captured"):
        run(tmp_path, cap, "d", hook_point="resid_pre.9")
    run(tmp_path, cap, "e")
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["kind"] == "preprocessed"


def test_external_shuffle_is_the_key_order_whatever_the_memory_budget(tmp_path):
    """A budget of a few kB forces many buckets: the output is byte-identical to the one-bucket run and
    is the training rows sorted by their seeded keys (the shuffle's definition)."""
    from pipeline.preprocessing.shuffle import row_keys

    truth = fake_capture(tmp_path / "cap", dtype=torch.bfloat16)
    many, _ = run(tmp_path, tmp_path / "cap", "many", workers=2, seed=3, memory_gb=2e-5)
    one, _ = run(tmp_path, tmp_path / "cap", "one", workers=1, seed=3)
    assert many["shuffle"]["buckets"] >= 16 and one["shuffle"]["buckets"] == 1
    for name in ("train_acts.npy", "train_index.npy", "val_acts.npy", "val_index.npy"):
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    idx = np.load(tmp_path / "many" / "train_index.npy")
    expected = sorted((int(k), s, p) for (s, p), k in zip(idx.tolist(), row_keys(idx[:, 0], idx[:, 1], 3)))
    assert [(s, p) for _, s, p in expected] == [tuple(r) for r in idx.tolist()]
    rows = PreprocessedOutput.open(tmp_path / "many").activations("train").float().numpy()
    for r, (s, p) in zip(rows, idx.tolist()):
        np.testing.assert_array_equal(r, truth[(s, p)])


def test_a_failed_stage_leaves_no_empty_output_folder(tmp_path):
    """--batch-size larger than the data is found after the output folder is made: the command fails with one
    line and the folder it created is gone; a folder that was there before stays."""
    fake_capture(tmp_path / "cap")
    for out in (tmp_path / "new" / "pp", tmp_path / "kept"):
        if out.name == "kept":
            out.mkdir()
        cmd = [sys.executable, str(REPO / "sae_preprocessing.py"), "--capture", str(tmp_path / "cap")]
        p = subprocess.run([*cmd, "--out", str(out), "--batch-size", "10000000"], capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.startswith("error: --batch-size 10000000: larger than"), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new" / "pp").exists() and (tmp_path / "new").is_dir()  # only what it created
    assert (tmp_path / "kept").is_dir()
