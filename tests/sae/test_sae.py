"""TopK SAE: fast sparse path vs dense reference, decoder constraints, files, SAELens export."""

from __future__ import annotations

import json

import pytest
import torch

from llama_3 import PipelineInputError
from pipeline.sae.formats import export_saelens
from pipeline.sae.model import SaeConfig, TopKSae


def make(normalize="dataset", dtype=torch.float64, seed=0, **kw) -> TopKSae:
    torch.manual_seed(seed)
    cfg = SaeConfig(d_model=16, n_latents=64, k=5, normalize=normalize, input_scale=0.3, hook_point="resid_pre.3", **kw)
    sae = TopKSae(cfg).to(dtype)
    with torch.no_grad():  # non-trivial biases so every term matters
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.5)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


@pytest.mark.parametrize("normalize", ["dataset", "token", "none"])
def test_fast_and_dense_paths_agree_in_outputs_and_gradients(normalize):
    sae = make(normalize)
    x = torch.randn(50, 16, dtype=torch.float64) * 3 + 1
    grads = {}
    outs = {}
    for dense in (False, True):
        sae.zero_grad()
        out = sae(x, dense=dense)
        loss = (out.x_hat - x).pow(2).sum() + 0.1 * out.values.sum()
        loss.backward()
        order = out.indices.argsort(dim=1)
        outs[dense] = (out.x_hat.detach(), out.indices.gather(1, order), out.values.detach().gather(1, order))
        grads[dense] = {n: p.grad.clone() for n, p in sae.named_parameters()}
    torch.testing.assert_close(outs[False][0], outs[True][0], rtol=1e-12, atol=1e-12)
    assert torch.equal(outs[False][1], outs[True][1])
    torch.testing.assert_close(outs[False][2], outs[True][2], rtol=1e-12, atol=1e-12)
    for n in grads[True]:
        torch.testing.assert_close(grads[False][n], grads[True][n], rtol=1e-10, atol=1e-10, msg=n)
    assert grads[False]["W_enc"].abs().sum() > 0 and grads[False]["b_pre"].abs().sum() > 0


def test_input_gradient_agrees_too():
    sae = make()
    x1 = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    sae(x1).x_hat.pow(2).sum().backward()
    sae(x2, dense=True).x_hat.pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)


def test_decoder_rows_unit_norm_and_projected_gradient_orthogonal():
    sae = make()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64, dtype=torch.float64))  # per latent, not per dimension
    x = torch.randn(40, 16, dtype=torch.float64)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        (sae(x).x_hat - x).pow(2).sum().backward()
        sae.project_decoder_grad()
        dots = (sae.W_dec.grad * sae.W_dec.detach()).sum(1)
        assert dots.abs().max() < 1e-12 * sae.W_dec.grad.abs().max()  # no component along its own decoder row
        opt.step()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64, dtype=torch.float64))


def test_encoder_initialised_as_decoder_transpose():
    sae = TopKSae(SaeConfig(d_model=8, n_latents=32, k=4))
    from pipeline.sae.model import ENCODER_INIT_NORM

    # both [L, d]: encoding multiplies by W_enc^T, i.e. the decoder's transpose, scaled
    torch.testing.assert_close(sae.W_enc, sae.W_dec * ENCODER_INIT_NORM, rtol=0, atol=0)
    torch.testing.assert_close(sae.W_enc.norm(dim=1), torch.full((32,), 3**-0.5))


def test_massive_activations_pass_through_without_loss_or_latents():
    """Rows above sink_norm: x̂ = x, no latent active, no gradient from them; the other rows exactly as without
    the threshold (a steered reconstruction leaves them as they are too)."""
    from pipeline.steering.splice import SteeringEntry, steered_reconstruction

    x = torch.randn(40, 16, dtype=torch.float64) * 3 + 1
    x[[3, 17, 30]] *= 60
    norms = x.norm(dim=1)
    sink = norms > 10 * norms.median()
    assert sink.sum() == 3
    plain, with_sinks = make(), make(sink_norm=float(10 * norms.median()))
    out, ref = with_sinks(x), plain(x)
    assert torch.equal(out.x_hat[sink], x[sink]) and (out.values[sink] == 0).all()
    assert torch.equal(out.x_hat[~sink], ref.x_hat[~sink]) and torch.equal(out.values[~sink], ref.values[~sink])
    (out.x_hat - x).pow(2).sum().backward()
    plain_loss = (plain(x[~sink]).x_hat - x[~sink]).pow(2).sum()
    plain_loss.backward()
    for (name, p), q in zip(with_sinks.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=name)
    steered = steered_reconstruction(with_sinks, x, [SteeringEntry(5, "add", 3.0)])
    assert torch.equal(steered[sink], x[sink].to(steered.dtype))
    assert not torch.equal(steered[~sink], out.x_hat[~sink].to(steered.dtype))


def test_h_bias_steers_without_being_trained():
    sae = make()
    x = torch.randn(10, 16, dtype=torch.float64)
    sae.h_bias[7] = 100.0
    out = sae(x)
    assert (out.indices == 7).any(dim=1).all()
    assert "h_bias" not in dict(sae.named_parameters()) and "h_bias" not in sae.state_dict()


def test_save_load_round_trip(tmp_path):
    sae = make(dtype=torch.float32, model={"path": "m.gguf"}, exclude_first_positions=1)
    sae.save(tmp_path / "s")
    again = TopKSae.load(tmp_path / "s")
    assert again.cfg == sae.cfg
    x = torch.randn(9, 16)
    assert torch.equal(again(x).x_hat, sae(x).x_hat)
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["k"] == 5


def jumprelu_sae() -> TopKSae:
    torch.manual_seed(2)
    sae = TopKSae(SaeConfig(d_model=16, n_latents=64, k=0, normalize="none", activation="jumprelu"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_pre.normal_(0, 0.3)
        sae.threshold.uniform_(0.0, 0.5)
    return sae


def test_jumprelu_code_is_the_dense_jumprelu_with_and_without_h_bias():
    """Reference: the dense JumpReLU on [N, L] (ReLU(pre) where pre > threshold), written out here."""
    from pipeline.steering.splice import SteeringEntry, steered_codes

    sae = jumprelu_sae()
    x = torch.randn(50, 16)
    with torch.no_grad():
        for entries, shift in (([], 0.0), ([SteeringEntry(7, "h_bias", 0.8)], 0.8)):
            pre = (x - sae.b_pre) @ sae.W_enc.t() + sae.b_enc
            pre[:, 7] += shift
            reference = torch.where(pre > sae.threshold, pre.relu(), torch.zeros(()))
            for dense in (False, True):
                values, indices = steered_codes(sae, x, entries) if entries else sae.encode(x, dense=dense)
                assert values.shape[1] == int((reference > 0).sum(1).max())
                assert all(len(set(row)) == len(row) for row in indices.tolist())  # distinct ids per row
                code = torch.zeros(50, 64).scatter(1, indices, values)
                torch.testing.assert_close(code, reference, rtol=1e-5, atol=1e-6)
            if not entries:
                torch.testing.assert_close(sae(x).x_hat, reference @ sae.W_dec + sae.b_pre, rtol=1e-5, atol=1e-5)


def test_a_jumprelu_sae_round_trips_through_our_files(tmp_path):
    sae = jumprelu_sae()
    sae.save(tmp_path / "j")
    again = TopKSae.load(tmp_path / "j")
    assert again.cfg == sae.cfg and torch.equal(again.threshold, sae.threshold)
    x = torch.randn(9, 16)
    assert torch.equal(again(x).x_hat, sae(x).x_hat)
    with pytest.raises(PipelineInputError, match="k=3 with jumprelu"):
        SaeConfig(d_model=16, n_latents=64, k=3, activation="jumprelu")
    with pytest.raises(PipelineInputError, match="activation='gated'"):
        SaeConfig(d_model=16, n_latents=64, k=3, activation="gated")


@pytest.mark.parametrize("unit_decoder", [False, True])
@pytest.mark.parametrize("normalize", ["dataset", "none"])
def test_saelens_loads_our_export_with_our_latents_and_reconstruction(tmp_path, normalize, unit_decoder):
    from sae_lens import SAE, TopKSAE  # the real package, not a re-implementation

    sae = make(normalize, dtype=torch.float32)
    export_saelens(sae, tmp_path / "lens", unit_decoder=unit_decoder)
    theirs = SAE.load_from_disk(tmp_path / "lens")
    assert isinstance(theirs, TopKSAE) and theirs.cfg.k == 5 and (theirs.cfg.d_in, theirs.cfg.d_sae) == (16, 64)
    assert theirs.cfg.rescale_acts_by_decoder_norm is unit_decoder
    s = sae.cfg.input_scale if normalize == "dataset" else 1.0
    if unit_decoder:  # sae-dashboard folds W_dec norms: unit rows make that a no-op
        torch.testing.assert_close(theirs.W_dec.norm(dim=1), torch.ones(64))
    x = torch.randn(30, 16) * 4
    with torch.no_grad():
        ours = sae(x)
        latents = theirs.encode(x)
        x_hat = theirs.decode(latents)
    dense = torch.zeros(30, 64).scatter(1, ours.indices, ours.values)
    torch.testing.assert_close(latents, dense / (s if unit_decoder else 1.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_hat, ours.x_hat, rtol=1e-4, atol=1e-4)


def test_bad_config_and_files(tmp_path):
    with pytest.raises(PipelineInputError, match="k=65 must be in 1..n_latents=64"):
        SaeConfig(d_model=16, n_latents=64, k=65)
    with pytest.raises(PipelineInputError, match="normalize="):
        SaeConfig(d_model=16, n_latents=64, k=4, normalize="layer")
    with pytest.raises(PipelineInputError, match="cfg.json: file not found"):
        TopKSae.load(tmp_path)
