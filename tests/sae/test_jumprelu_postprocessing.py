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
