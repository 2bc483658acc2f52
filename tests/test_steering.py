"""Steering through an SAE splice: exact clean model without steering, each mode raises its latent."""

from __future__ import annotations

import pytest
import torch

from conftest import random_tokens
from llama_3 import LlamaInputError, load_model
from pipeline.steering import SteeringEntry, sae_splice, steered_reconstruction
from sae import SaeConfig, TopKSae

HOOK = "resid_pre.1"


@pytest.fixture(scope="module")
def lm_and_sae(tiny):
    lm = load_model(tiny.hf_dir)
    torch.manual_seed(0)
    sae = TopKSae(SaeConfig(d_model=lm.args.dim, n_latents=64, k=4, hook_point=HOOK, model=lm.identity())).eval()
    return lm, sae


def test_unsteered_splice_with_error_term_is_exactly_the_clean_model(lm_and_sae):
    lm, sae = lm_and_sae
    tokens = random_tokens(lm.args.vocab_size, (3, 12))
    with torch.no_grad():
        clean = lm.model(tokens)
        spliced, _ = lm.model.run_with_hooks(tokens, splice={HOOK: sae_splice(sae)})
        pure, _ = lm.model.run_with_hooks(tokens, splice={HOOK: sae_splice(sae, keep_error=False)})
        reference, _ = lm.model.run_with_hooks(tokens, splice={HOOK: sae.reconstruct})
    assert torch.equal(spliced, clean)
    torch.testing.assert_close(pure, reference)
    assert not torch.allclose(pure, clean)  # a random SAE loses a lot


@pytest.mark.parametrize("entry", [SteeringEntry(5, "h_bias", 20.0), SteeringEntry(5, "clamp", 10.0), SteeringEntry(5, "add", 10.0)])
def test_each_mode_raises_its_latent_in_the_steered_stream(lm_and_sae, entry):
    lm, sae = lm_and_sae
    tokens = random_tokens(lm.args.vocab_size, (2, 10), seed=1)
    with torch.no_grad():
        x = lm.model.capture(tokens, [HOOK])[HOOK]
        steered = x + (steered_reconstruction(sae, x, [entry]) - sae(x.reshape(-1, x.shape[-1])).x_hat.reshape(x.shape))

        def activation(stream):
            out = sae(stream.reshape(-1, stream.shape[-1]))
            return (out.values * (out.indices == 5)).sum(-1).mean()

        assert activation(steered) > activation(x) + 1.0
        # only masked positions change
        mask = torch.zeros(2, 10, dtype=torch.bool)
        mask[:, 6:] = True
        logits_masked, _ = lm.model.run_with_hooks(tokens, splice={HOOK: sae_splice(sae, [entry], position_mask=mask)})
        clean = lm.model(tokens)
        assert torch.equal(logits_masked[:, :6], clean[:, :6]) and not torch.allclose(logits_masked[:, 6:], clean[:, 6:])


def test_bad_steering_entries(lm_and_sae):
    _, sae = lm_and_sae
    with pytest.raises(LlamaInputError, match="LATENT:MODE:STRENGTH"):
        SteeringEntry.parse("five:clamp:1")
    with pytest.raises(LlamaInputError, match="mode must be one of"):
        sae_splice(sae, [SteeringEntry.parse("3:boost:1")])
    with pytest.raises(LlamaInputError, match="latents 0..63"):
        sae_splice(sae, [SteeringEntry.parse("64:clamp:1")])
    assert SteeringEntry.parse("7:2.5") == SteeringEntry(7, "h_bias", 2.5)
