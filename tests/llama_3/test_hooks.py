"""Hook-point names, splice semantics (error term), and rejection of bad hook points."""

from __future__ import annotations

import pytest
import torch

from llama_3 import HookPoint, PipelineInputError, Splice, default_capture_layer
from tests.conftest import random_tokens


def test_hook_point_names_round_trip_and_order():
    names = ["resid_post.1", "mlp_out.1", "resid_pre.1", "attn_norm.1", "resid_pre.0", "ffn_norm.1", "resid_mid.1"]
    pts = sorted(HookPoint.parse(n, 4) for n in names + ["attn_out.1"])
    assert [p.name for p in pts] == [
        "resid_pre.0",
        "resid_pre.1",
        "attn_norm.1",
        "attn_out.1",
        "resid_mid.1",
        "ffn_norm.1",
        "mlp_out.1",
        "resid_post.1",
    ]


@pytest.mark.parametrize(
    "name, message",
    [
        ("resid_pre.4", "out of range"),
        ("resid_pre.-1", "out of range"),
        ("resid.1", "expected <kind>.<layer>"),
        ("resid_pre", "expected <kind>.<layer>"),
        ("resid_pre.x", "expected <kind>.<layer>"),
    ],
)
def test_bad_hook_points(tiny_model, name, message):
    tokens = random_tokens(tiny_model.args.vocab_size, (1, 4))
    with pytest.raises(PipelineInputError, match=message):
        tiny_model.model.capture(tokens, [name])
    with pytest.raises(PipelineInputError, match=message):
        tiny_model.model.run_with_hooks(tokens, splice={name: lambda x: x})


def test_resid_post_equals_next_resid_pre(tiny_model):
    tokens = random_tokens(tiny_model.args.vocab_size, (2, 9))
    with torch.no_grad():
        out = tiny_model.model.capture(tokens, ["resid_post.1", "resid_pre.2"])
    assert torch.equal(out["resid_post.1"], out["resid_pre.2"])


def test_splice_error_term_leaves_only_the_intervention(tiny_model):
    """With add_error, the stream becomes x + (fn(x) - clean_fn(x)): a lossy 'SAE' plus a bias acts as the bias
    alone."""
    model = tiny_model.model
    tokens = random_tokens(model.args.vocab_size, (2, 13), seed=2)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(model.args.dim, 8, generator=g) / 8  # rank-8 'reconstruction': far from x
    bias = torch.randn(model.args.dim, generator=g)
    lossy = lambda x: (x @ W) @ W.T  # noqa: E731
    steered = lambda x: lossy(x) + bias  # noqa: E731
    with torch.no_grad():
        only_bias, _ = model.run_with_hooks(tokens, splice={"resid_pre.2": lambda x: x + bias})
        with_error, _ = model.run_with_hooks(
            tokens, splice={"resid_pre.2": Splice(steered, add_error=True, clean_fn=lossy)}
        )
        without_error, _ = model.run_with_hooks(tokens, splice={"resid_pre.2": steered})
        plain = model(tokens)
        identity_err, _ = model.run_with_hooks(tokens, splice={"resid_pre.2": Splice(lossy, add_error=True)})
    assert (with_error - only_bias).abs().max() < 1e-4
    assert (without_error - only_bias).abs().max() > 1e-2
    assert (identity_err - plain).abs().max() < 1e-4  # clean_fn defaults to fn: no intervention, no change


def test_splice_shape_mismatch_is_an_error(tiny_model):
    tokens = random_tokens(tiny_model.args.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="shape"):
        tiny_model.model.run_with_hooks(tokens, splice={"resid_pre.1": lambda x: x[..., :3]})


def test_default_capture_layer_is_five_sixths():
    assert default_capture_layer(30) == 25 and default_capture_layer(28) == 23 and default_capture_layer(32) == 27


def test_every_site_equals_transformer_lens_hooks(tiny):
    """An independent reference: TransformerLens running the same checkpoint as a plain LlamaForCausalLM. Its
    hook_attn_out / hook_mlp_out are what each sub-block adds, hook_mlp_in the stream the MLP's norm reads
    (our resid_mid), and ln2.hook_normalized times ln2.w our ffn_norm (the MLP's input)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from llama_3 import load_model

    lm = load_model(tiny.hf_dir)
    cfg = HookedTransformerConfig(**convert_hf_model_config(str(tiny.hf_dir)))
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        convert_llama_weights(tiny.reference, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    tl.set_use_hook_mlp_in(True)
    tokens = random_tokens(lm.args.vocab_size, (2, 11), seed=4)
    L = 1
    ours_names = [f"{k}.{L}" for k in ("attn_out", "mlp_out", "resid_mid", "ffn_norm", "resid_post")]
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens)
        ours = lm.model.capture(tokens, ours_names)
    theirs = {
        "attn_out": cache[f"blocks.{L}.hook_attn_out"],
        "mlp_out": cache[f"blocks.{L}.hook_mlp_out"],
        "resid_mid": cache[f"blocks.{L}.hook_mlp_in"],
        "ffn_norm": cache[f"blocks.{L}.ln2.hook_normalized"] * tl.blocks[L].ln2.w,
        "resid_post": cache[f"blocks.{L}.hook_resid_post"],
    }
    for kind, ref in theirs.items():
        torch.testing.assert_close(ours[f"{kind}.{L}"], ref, rtol=1e-4, atol=1e-5, msg=kind)
    # the sub-blocks' outputs add up to the stream, as the names promise
    pre = lm.model.capture(tokens, [f"resid_pre.{L}"])[f"resid_pre.{L}"]
    torch.testing.assert_close(pre + ours[f"attn_out.{L}"], ours[f"resid_mid.{L}"])


def test_a_splice_with_a_source_replaces_the_mlp(tiny_model):
    """A transcoder-style splice at mlp_out.L reading ffn_norm.L: with the block's own MLP as fn the forward is
    unchanged; with zero it equals zero-ablating mlp_out; its error term leaves only the intervention."""
    model = tiny_model.model
    tokens = random_tokens(model.args.vocab_size, (2, 9), seed=5)
    mlp = model.layers[1].feed_forward
    bias = torch.randn(model.args.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(tokens)
        same, _ = model.run_with_hooks(tokens, splice={"mlp_out.1": Splice(mlp, source="ffn_norm.1")})
        zero_src, _ = model.run_with_hooks(
            tokens, splice={"mlp_out.1": Splice(lambda h: torch.zeros_like(h), source="ffn_norm.1")}
        )
        zeroed, _ = model.run_with_hooks(tokens, splice={"mlp_out.1": lambda m: torch.zeros_like(m)})
        lossy = lambda h: 0.5 * mlp(h)  # noqa: E731
        steered, _ = model.run_with_hooks(
            tokens,
            splice={
                "mlp_out.1": Splice(lambda h: lossy(h) + bias, add_error=True, clean_fn=lossy, source="ffn_norm.1")
            },
        )
        only_bias, _ = model.run_with_hooks(tokens, splice={"mlp_out.1": lambda m: m + bias})
    torch.testing.assert_close(same, plain)
    torch.testing.assert_close(zero_src, zeroed)
    assert (zeroed - plain).abs().max() > 1e-2
    torch.testing.assert_close(steered, only_bias, rtol=1e-4, atol=1e-4)
    with pytest.raises(PipelineInputError, match="earlier point of block 1"):
        model.run_with_hooks(tokens, splice={"ffn_norm.1": Splice(lambda h: h, source="mlp_out.1")})
