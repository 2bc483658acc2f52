"""Spliced evaluation (CE recovered, KL) against transformers with the same edit made by a forward pre-hook."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.core.tokenization import Tokenization
from pipeline.sae.splice_eval import splice_eval
from tests.tiny_checkpoints import SAMPLE_TEXT

TEXTS = [SAMPLE_TEXT, "The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "42 times?!"]


def reference_ce(reference, tok, texts, layer, edit, exclude_first):
    """Mean next-token CE from transformers, one sentence at a time, editing block `layer`'s input."""
    total, n = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok.encode(text, bos=False)])

        def pre_hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h = h.clone()
            h[:, exclude_first:] = edit(h[:, exclude_first:])
            if args:
                return (h,) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": h}

        handle = reference.model.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = reference(ids).logits
        finally:
            handle.remove()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total += nll.item()
        n += ids.shape[1] - 1
    return total / n


def test_splice_eval_matches_reference_and_identity_recovers_everything(tiny, tiny_model):
    tok = tiny_model.tokenizer
    shrink = lambda x: 0.5 * x  # noqa: E731  a lossy stand-in for an SAE
    m = splice_eval(
        tiny_model, shrink, TEXTS, "resid_pre.2", Tokenization(exclude_first_positions=1), max_batch_tokens=24
    )
    ref_clean = reference_ce(tiny.reference, tok, TEXTS, 2, lambda h: h, 1)
    ref_sae = reference_ce(tiny.reference, tok, TEXTS, 2, shrink, 1)
    ref_zero = reference_ce(tiny.reference, tok, TEXTS, 2, torch.zeros_like, 1)
    assert math.isclose(m["eval/ce_clean"], ref_clean, rel_tol=1e-5)
    assert math.isclose(m["eval/ce_sae"], ref_sae, rel_tol=1e-5)
    assert math.isclose(m["eval/ce_zero_ablation"], ref_zero, rel_tol=1e-5)
    # The ratio is ill-conditioned where zero ablation barely moves CE (a random model): check its numerator.
    assert math.isclose(
        m["eval/ce_loss_recovered"] * (ref_zero - ref_clean), ref_zero - ref_sae, abs_tol=1e-5 * ref_clean
    )
    assert m["eval/kl_sae"] > 0 and m["eval/kl_zero_ablation"] > 0
    ident = splice_eval(tiny_model, lambda x: x, TEXTS, "resid_pre.2", Tokenization(exclude_first_positions=1))
    assert math.isclose(ident["eval/ce_loss_recovered"], 1.0, rel_tol=1e-6) and abs(ident["eval/kl_sae"]) < 1e-6


def test_massive_activations_keep_their_value_in_both_splices(tiny, tiny_model):
    """Tokens above the SAE's sink_norm are left as they are, like the first position: in the spliced run and
    in the zero ablation (reference: transformers, editing only the tokens below the threshold)."""
    tok = tiny_model.tokenizer
    with torch.no_grad():
        norms = torch.cat(
            [
                tiny_model.model.capture(torch.tensor([tok.encode(t, bos=False)]), ["resid_pre.2"])["resid_pre.2"][
                    0, 1:
                ]
                .float()
                .norm(dim=-1)
                for t in TEXTS
            ]
        )
    sink_norm = float(norms.median())  # half the tokens count as sinks: a test that cannot pass by accident
    assert 0 < int((norms > sink_norm).sum()) < len(norms)
    shrink = lambda x: 0.5 * x  # noqa: E731

    def below(edit):
        return lambda h: torch.where(h.float().norm(dim=-1, keepdim=True) > sink_norm, h, edit(h))

    tokenization = Tokenization(exclude_first_positions=1, sink_norm=sink_norm)
    m = splice_eval(tiny_model, shrink, TEXTS, "resid_pre.2", tokenization, max_batch_tokens=24)
    assert math.isclose(m["eval/ce_sae"], reference_ce(tiny.reference, tok, TEXTS, 2, below(shrink), 1), rel_tol=1e-5)
    ref_zero = reference_ce(tiny.reference, tok, TEXTS, 2, below(torch.zeros_like), 1)
    assert math.isclose(m["eval/ce_zero_ablation"], ref_zero, rel_tol=1e-5)
    plain = splice_eval(tiny_model, shrink, TEXTS, "resid_pre.2", Tokenization(exclude_first_positions=1))
    assert not math.isclose(plain["eval/ce_sae"], m["eval/ce_sae"], rel_tol=1e-4)
