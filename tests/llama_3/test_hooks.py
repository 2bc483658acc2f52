"""Hook-point names, splice semantics (error term), and rejection of bad hook points."""

from __future__ import annotations

import pytest
import torch

from llama_3 import HookPoint, PipelineInputError, Splice, default_capture_layer
from tests.conftest import random_tokens


def test_hook_point_names_round_trip_and_order():
    names = ["resid_post.1", "resid_pre.1", "attn_norm.1", "resid_pre.0", "ffn_norm.1", "resid_mid.1"]
    pts = sorted(HookPoint.parse(n, 4) for n in names)
    assert [p.name for p in pts] == [
        "resid_pre.0",
        "resid_pre.1",
        "attn_norm.1",
        "resid_mid.1",
        "ffn_norm.1",
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
