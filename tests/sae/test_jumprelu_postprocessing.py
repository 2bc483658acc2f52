"""TopK -> JumpReLU post-processing: each latent fires on the calibration tokens exactly as often as under TopK
(checked by brute force on the dense pre-activations), the converted SAE runs in SAELens as its JumpReLU SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_3.errors import PipelineInputError
from pipeline.sae.formats import export_saelens
from pipeline.sae.jumprelu import jumprelu_thresholds, to_jumprelu
from pipeline.sae.model import SaeConfig, TopKSae


def trained_like(seed: int = 0, **kw) -> TopKSae:
    torch.manual_seed(seed)
    sae = TopKSae(SaeConfig(d_model=24, n_latents=96, k=6, input_scale=0.7, hook_point="resid_post.1", **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_pre.normal_(0, 0.5)
    return sae


def test_every_latent_fires_as_often_as_under_topk():
    sae = trained_like()
    x = torch.randn(3000, 24) * 2
    thresholds, summary = jumprelu_thresholds(sae, lambda: x.split(700))
    with torch.no_grad():
        pre = ((x * 0.7 - sae.b_pre) @ sae.W_enc.t() + sae.b_enc).numpy()
    topk_fires = np.zeros(96, dtype=int)
    for row in pre:
        top = np.argsort(-row)[:6]
        topk_fires[top[row[top] > 0]] += 1
    assert summary["calibration_tokens"] == 3000 and summary["mean_topk_l0"] == pytest.approx(topk_fires.sum() / 3000)
    jump = to_jumprelu(sae, thresholds)
    with torch.no_grad():
        out = jump(x)
    fires = np.zeros(96, dtype=int)
    np.add.at(fires, out.indices[out.values > 0].numpy(), 1)
    np.testing.assert_array_equal(fires, topk_fires)  # same count per latent (pre-activations have no ties)
    for i in np.flatnonzero(topk_fires)[:10]:  # θ_i is the (c_i + 1)-th largest pre-activation, by sorting
        assert float(thresholds[i]) == pytest.approx(max(np.sort(pre[:, i])[::-1][topk_fires[i]], 0.0), rel=1e-6)
    assert torch.isinf(thresholds[topk_fires == 0]).all()
    assert jump.cfg.activation == "jumprelu" and jump.cfg.k == 0
    with pytest.raises(PipelineInputError, match="already jumprelu"):
        jumprelu_thresholds(jump, lambda: [x])


def test_the_converted_sae_is_saelens_jumprelu(tmp_path):
    from sae_lens import SAE

    sae = trained_like(1)
    x = torch.randn(2000, 24)
    jump = to_jumprelu(sae, jumprelu_thresholds(sae, lambda: [x])[0])
    export_saelens(jump, tmp_path / "lens")
    theirs = SAE.load_from_disk(tmp_path / "lens")
    assert theirs.cfg.architecture() == "jumprelu"
    x = torch.randn(200, 24)  # not the calibration tokens: one of those sits exactly on each threshold
    with torch.no_grad():
        torch.testing.assert_close(theirs(x[:200]), jump(x[:200]).x_hat, rtol=1e-4, atol=1e-4)
        back = TopKSae.load(tmp_path / "lens")
        torch.testing.assert_close(back(x[:200]).x_hat, jump(x[:200]).x_hat, rtol=1e-4, atol=1e-4)


def test_the_jumprelu_command_converts_a_trained_sae(tmp_path):
    """`python sae.py jumprelu`: calibrates on the SAE's own training data, writes an SAE folder that loads as
    JumpReLU with its record; bad input is one line and exit 2, nothing written."""
    import json
    import subprocess
    import sys

    from sae_training import main as train_main
    from tests.sae.test_sae_training import REPO, cfg, fake_preprocessed, synthetic

    x, _ = synthetic(3000)
    data = fake_preprocessed(tmp_path / "data", x[:2500], x[2500:])
    train_main(cfg(data, tmp_path / "run", n_latents=64, k=4, eval_sentences=0))
    cmd = [sys.executable, str(REPO / "sae.py"), "jumprelu", "--sae", str(tmp_path / "run" / "sae")]
    done = subprocess.run(cmd + ["--out", str(tmp_path / "jump"), "--tokens", "2000"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    jump = TopKSae.load(tmp_path / "jump")
    record = json.loads((tmp_path / "jump" / "jumprelu.json").read_text())
    assert jump.cfg.activation == "jumprelu" and record["calibration_tokens"] == 2000
    assert record["source_sha256"] == TopKSae.load(tmp_path / "run" / "sae").sha256
    again = subprocess.run(cmd + ["--out", str(tmp_path / "jump")], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "not an empty folder" in again.stderr
    other = subprocess.run(
        cmd + ["--out", str(tmp_path / "j2"), "--data", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert other.returncode == 2 and "nope" in other.stderr and not (tmp_path / "j2").exists()
