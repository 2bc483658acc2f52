"""Parity with an independent implementation (transformers' LlamaForCausalLM) on tiny random weights."""

from __future__ import annotations

import pytest
import torch

from llama_3.checkpoints import meta_to_hf_state_dict
from tests.conftest import random_tokens

FP32_ATOL = 1e-4  # logits are O(1); fp32 matmul reorderings stay far below this


def test_logits_match_transformers(tiny, tiny_model):
    tokens = random_tokens(tiny_model.args.vocab_size, (3, 48), seed=1)
    with torch.no_grad():
        ours = tiny_model.model(tokens)
        ref = tiny.reference(tokens).logits
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < FP32_ATOL, diff
    # The sequence is long enough that all three Llama-3 RoPE bands matter: unscaled RoPE must differ.
    assert ref.abs().max() > 0.1


def test_rope_scaling_is_exercised(tiny, tiny_model):
    """Dropping the Llama-3 scaling changes the logits by far more than the parity tolerance."""
    from llama_3.model import Transformer

    args = tiny_model.args
    unscaled_args = type(args)(**{**args.to_dict(), "rope_scaling": None})
    unscaled = Transformer(unscaled_args)
    unscaled.load_state_dict(tiny_model.model.state_dict())
    tokens = random_tokens(args.vocab_size, (1, 48), seed=2)
    with torch.no_grad():
        delta = (unscaled(tokens) - tiny.reference(tokens).logits).abs().max().item()
    assert delta > 100 * FP32_ATOL


def test_weights_round_trip_to_hf_layout(tiny, tiny_model):
    """Our Q/K un-permutation is the exact inverse of HF's converter layout."""
    back = meta_to_hf_state_dict(tiny_model.model.state_dict(), tiny_model.args)
    ref = tiny.reference.state_dict()
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k


def test_resid_pre_capture_matches_hidden_states(tiny, tiny_model):
    tokens = random_tokens(tiny_model.args.vocab_size, (2, 33), seed=5)
    with torch.no_grad():
        ref = tiny.reference(tokens, output_hidden_states=True).hidden_states  # ref[L] enters block L
        for layer in range(tiny_model.args.n_layers):
            got = tiny_model.model.capture(tokens, [f"resid_pre.{layer}"])[f"resid_pre.{layer}"]
            rel = ((got - ref[layer]).abs().max() / ref[layer].abs().max()).item()
            assert rel < 1e-6, (layer, rel)


def test_attn_norm_capture_matches_input_layernorm_output(tiny, tiny_model):
    layer = 2
    seen = {}
    handle = tiny.reference.model.layers[layer].input_layernorm.register_forward_hook(
        lambda m, i, o: seen.setdefault("x", o)
    )
    tokens = random_tokens(tiny_model.args.vocab_size, (2, 21), seed=6)
    try:
        with torch.no_grad():
            tiny.reference(tokens)
            got = tiny_model.model.capture(tokens, [f"attn_norm.{layer}"])[f"attn_norm.{layer}"]
    finally:
        handle.remove()
    assert ((got - seen["x"]).abs().max() / seen["x"].abs().max()).item() < 1e-6


def test_capture_only_forward_skips_later_blocks(tiny_model):
    model = tiny_model.model
    calls: list[str] = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(f"block{i}"))
        for i, layer in enumerate(model.layers)
    ]
    handles += [
        model.norm.register_forward_pre_hook(lambda m, a: calls.append("norm")),
        model.output.register_forward_pre_hook(lambda m, a: calls.append("output")),
    ]
    ffn = model.layers[1].feed_forward.register_forward_pre_hook(lambda m, a: calls.append("ffn1"))
    tokens = random_tokens(model.args.vocab_size, (1, 8))
    try:
        with torch.no_grad():
            model.capture(tokens, ["resid_pre.1"])
            assert calls == ["block0"]
            calls.clear()
            out = model.capture(tokens, ["attn_norm.1", "resid_pre.0"])
            assert calls == ["block0", "block1"]  # block 1 entered, but stops after its attention norm
            assert set(out) == {"attn_norm.1", "resid_pre.0"}
    finally:
        for h in handles + [ffn]:
            h.remove()


def test_splice_matches_reference_with_hook(tiny, tiny_model):
    """Splicing resid_post.1 -> 0.5 * x + c equals the same edit done with a forward hook in transformers."""
    c = torch.randn(tiny_model.args.dim, generator=torch.Generator().manual_seed(0))
    edit = lambda x: 0.5 * x + c  # noqa: E731
    handle = tiny.reference.model.layers[1].register_forward_hook(
        lambda m, i, o: edit(o[0] if isinstance(o, tuple) else o) if not isinstance(o, tuple) else (edit(o[0]),) + o[1:]
    )
    tokens = random_tokens(tiny_model.args.vocab_size, (2, 19), seed=7)
    try:
        with torch.no_grad():
            ref = tiny.reference(tokens).logits
            ours, _ = tiny_model.model.run_with_hooks(tokens, splice={"resid_post.1": edit})
    finally:
        handle.remove()
    assert (ours - ref).abs().max().item() < FP32_ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_runs_close_to_fp32(tiny_model, dtype):
    from llama_3 import load_model

    low = load_model(tiny_model.path, dtype=dtype)
    tokens = random_tokens(low.args.vocab_size, (1, 16), seed=8)
    with torch.no_grad():
        a, b = low.model(tokens), tiny_model.model(tokens)
    assert a.dtype == dtype and low.model.layers[0].attention.wq.weight.dtype == dtype
    assert ((a.float() - b).abs().max() / b.abs().max()).item() < 0.1


def test_prepacked_cpu_linears_match_and_fall_back(tiny):
    """oneDNN-prepacked projections give the same logits; autograd and weight edits use the plain path."""
    from llama_3 import load_model
    from llama_3.cpu_fast import apply_cpu_fast_paths

    lm = load_model(tiny.hf_dir)
    model = lm.model
    names = set(model.state_dict())
    tokens = random_tokens(lm.args.vocab_size, (2, 23), seed=9)
    with torch.no_grad():
        plain = model(tokens)
        assert apply_cpu_fast_paths(model) == 7 * lm.args.n_layers
        assert set(model.state_dict()) == names  # the swap keeps every weight's name
        packed = model(tokens)
        assert ((packed - plain).abs().max() / plain.abs().max()).item() < 1e-5
        assert ((packed - tiny.reference(tokens).logits).abs().max()).item() < FP32_ATOL
        model.layers[0].attention.wq.weight.mul_(2)  # an edit invalidates the packed copy
        edited = model(tokens)
        model.layers[0].attention.wq.weight.div_(2)
    assert (edited - plain).abs().max() > 1e-3
    loss = model(tokens).float().logsumexp(-1).mean()  # with autograd: the differentiable path
    loss.backward()
    assert model.layers[0].attention.wq.weight.grad is not None
