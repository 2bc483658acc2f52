"""Bad input: one clear line naming the file/flag/field, and a nonzero exit from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_3 import PipelineInputError, load_model
from llama_3.generation import Generator
from tests.tiny_checkpoints import make_hf_reference, write_hf_tokenizer

REPO = Path(__file__).resolve().parents[2]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def test_missing_path():
    with pytest.raises(PipelineInputError, match="no such file or directory"):
        load_model("/nonexistent/model")


def test_empty_dir(tmp_path):
    with pytest.raises(PipelineInputError, match="neither a Meta checkpoint"):
        load_model(tmp_path)


def test_hf_missing_tokenizer(tiny, tmp_path):
    d = copy(tiny.hf_dir, tmp_path / "hf")
    (d / "tokenizer.json").unlink()
    with pytest.raises(PipelineInputError, match=r"tokenizer\.json: file not found"):
        load_model(d)


def test_hf_truncated_weights(tiny, tmp_path):
    d = copy(tiny.hf_dir, tmp_path / "hf")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineInputError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(d)


def test_hf_index_names_missing_shard(tiny, tmp_path):
    d = copy(tiny.hf_dir, tmp_path / "hf")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(PipelineInputError, match="missing"):
        load_model(d)


def test_meta_partial_checkpoint(tiny, tmp_path):
    d = copy(tiny.meta_dir, tmp_path / "meta")
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    del sd["layers.3.feed_forward.w2.weight"]
    torch.save(sd, d / "consolidated.00.pth")
    with pytest.raises(
        PipelineInputError, match=r"consolidated\.00\.pth: missing weight\(s\) layers\.3\.feed_forward\.w2\.weight"
    ):
        load_model(d)


def test_meta_params_do_not_match_weights(tiny, tmp_path):
    d = copy(tiny.meta_dir, tmp_path / "meta")
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**params, "n_layers": params["n_layers"] - 1}))
    with pytest.raises(PipelineInputError, match="unexpected weight"):
        load_model(d)
    (d / "params.json").write_text(json.dumps({**params, "n_kv_heads": params["n_heads"]}))
    with pytest.raises(PipelineInputError, match=r"weight layers\.0\.attention\.wk\.weight has shape"):
        load_model(d)


def test_meta_missing_tokenizer_and_pickle_is_refused(tiny, tmp_path):
    d = copy(tiny.meta_dir, tmp_path / "meta")
    (d / "tokenizer.model").unlink()
    with pytest.raises(PipelineInputError, match=r"tokenizer\.model: file not found"):
        load_model(d)
    d2 = copy(tiny.meta_dir, tmp_path / "meta2")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d2 / "consolidated.00.pth")
    with pytest.raises(PipelineInputError, match="weights-only"):
        load_model(d2)


def test_vocabulary_mismatch(tmp_path):
    model, tok = make_hf_reference(seed=1, vocab_size=300)  # tokenizer has 616 ids
    model.save_pretrained(tmp_path / "hf")
    write_hf_tokenizer(tok, tmp_path / "hf")
    with pytest.raises(PipelineInputError, match=r"tokenizer has \d+ tokens but the model's vocab_size is 300"):
        load_model(tmp_path / "hf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(PipelineInputError, match=r"bad\.gguf: not a readable GGUF file"):
        load_model(bad)


def test_prompt_longer_than_context(tiny):
    lm = load_model(tiny.hf_dir, max_seq_len=16)
    with pytest.raises(PipelineInputError, match="does not fit the model's context of 16 tokens"):
        Generator(lm).generate([[1] * 16], max_new_tokens=4)
    out = Generator(lm).generate([[1] * 10], max_new_tokens=50, temperature=0, stop_tokens=set())
    assert len(out[0].tokens) == 6 and out[0].finish_reason == "length"  # generation stops at the context


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "llama_3_inference.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_bad_model_path_is_one_line_and_nonzero():
    r = run_cli("--model", "/nonexistent/ckpt")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --model /nonexistent/ckpt: no such file or directory"]


def test_cli_bad_flag_values(tiny):
    r = run_cli("--model", str(tiny.gguf_path), "--dtype", "int3")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --dtype 'int3'")


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_flags_and_paths_are_checked_before_the_model_loads(tmp_path):
    """A missing model is the last thing a stage would find: the flags and input folders fail first (a real
    model takes seconds to minutes to load), one line each, exit 2."""
    model = ["--model", str(tmp_path / "no_model")]
    out = ["--out", str(tmp_path / "a")]
    p = cli("capture_activations.py", *model, "--sentences", str(tmp_path / "no_sentences"), *out)
    assert p.returncode == 2 and "no_sentences" in p.stderr and "no_model" not in p.stderr, p.stderr
    p = cli("capture_activations.py", *model, "--hook-points", "resid_pre", *out)
    assert p.returncode == 2 and "--hook-points 'resid_pre'" in p.stderr, p.stderr
    assert not (tmp_path / "a").exists()


def test_the_training_run_folder_as_sae_names_the_sae_inside(tmp_path):
    (tmp_path / "run" / "sae").mkdir(parents=True)
    (tmp_path / "run" / "sae" / "cfg.json").write_text("{}")
    for script in ("llama_3_inference.py", "capture_top_activating_sentences.py", "steering_evaluation.py"):
        argv = [script, "--sae", str(tmp_path / "run")]
        if script != "llama_3_inference.py":
            argv += ["--out", str(tmp_path / "out")]
        p = cli(*argv)
        expected = f"{tmp_path / 'run'}: a training run folder, not an SAE; the SAE is {tmp_path / 'run' / 'sae'}"
        assert p.returncode == 2 and expected in p.stderr and len(p.stderr.strip().splitlines()) == 1, (
            script,
            p.stderr,
        )
    assert not (tmp_path / "out").exists()
