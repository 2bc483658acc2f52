"""How much of the model's behaviour an SAE keeps, measured with the SAE spliced into the forward.

For held-out sentences: next-token cross-entropy of the clean model, with the hook point's
activation replaced by the SAE reconstruction, and with it zero-ablated; CE loss recovered =
(CE_zero - CE_sae) / (CE_zero - CE_clean); and KL(clean || spliced) per token (as Gemma Scope and
SAEBench report). Positions the training data excluded (attention sinks) and BOS are left as the
model computed them, so the splice touches exactly the tokens the SAE was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from llama_3.checkpoints import LoadedModel
from llama_3.hooks import HookPoint, HookRunner, Splice
from pipeline.core.tokenization import Tokenization


@dataclass
class SpliceTarget:
    """One SAE to splice: `reconstruct` replaces `hook_point` (its site), reading `source` when a transcoder's."""

    reconstruct: Callable[[torch.Tensor], torch.Tensor]
    hook_point: str
    source: str | None = None


def splice_eval(
    lm: LoadedModel,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    texts: Sequence[str],
    hook_point: str,
    tokenization: Tokenization,
    *,
    max_batch_tokens: int = 1024,
    source: str | None = None,
) -> dict:
    """CE clean / with the reconstruction / zero-ablated, CE loss recovered and KL, over `texts`
    tokenized as the SAE was trained (`tokenization`: BOS, truncation, the positions it never saw).
    A transcoder's `reconstruct` reads `source` (ffn_norm.L) and replaces `hook_point` (mlp_out.L): the MLP."""
    target = SpliceTarget(reconstruct, hook_point, source)
    return splice_eval_many(lm, [target], texts, tokenization, max_batch_tokens=max_batch_tokens)[0]


def batches_by_tokens(ids: list[list[int]], max_batch_tokens: int) -> list[list[list[int]]]:
    """Length-sorted sequences in batches of at most max_batch_tokens padded tokens."""
    chunks, cur = [], []
    for t in sorted(ids, key=len):  # sorted by length, so the padded size is (len(cur) + 1) * len(t)
        if cur and (len(cur) + 1) * len(t) > max_batch_tokens:
            chunks.append(cur)
            cur = []
        cur.append(t)
    return chunks + ([cur] if cur else [])


@torch.no_grad()
def splice_eval_many(
    lm: LoadedModel,
    targets: Sequence[SpliceTarget],
    texts: Sequence[str],
    tokenization: Tokenization,
    *,
    max_batch_tokens: int = 1024,
) -> list[dict]:
    """splice_eval for several SAEs on the same sentences (a suite): per batch the clean forward runs once and
    keeps the stream entering each spliced layer; every SAE's forward, and one zero-ablation per site, resume
    from there (Transformer.forward_from), so the blocks before a site are never recomputed."""
    model, tok = lm.model, lm.tokenizer
    device = model.tok_embeddings.weight.device
    ids = [t for t in tokenization.encode(tok, texts) if len(t) >= 2]
    layer_of = {t.hook_point: HookPoint.parse(t.hook_point, model.args.n_layers).layer for t in targets}
    streams = sorted({f"resid_pre.{layer}" for layer in layer_of.values()})
    sites = sorted(set(layer_of))
    sums = [{"sae": 0.0, "kl_sae": 0.0} for _ in targets]
    site_sums = {site: {"zero": 0.0, "kl_zero": 0.0} for site in sites}
    clean_sum, n = 0.0, 0
    skip, sink_norm = tokenization.skip_first_positions, tokenization.sink_norm
    # Batches by padded-token budget: two [B, T, vocab] fp32 logits tensors and their log-softmaxes
    # are alive at once (49k vocab: 200 MB each per 1k tokens), the peak memory of the training stage.
    for chunk in batches_by_tokens(ids, max_batch_tokens):
        T = max(map(len, chunk))
        tokens = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        for i, t in enumerate(chunk):
            tokens[i, : len(t)] = torch.tensor(t)
        lengths = torch.tensor([len(t) for t in chunk])
        pos = torch.arange(T)[None, :]
        target_mask = (pos[:, 1:] < lengths[:, None]).to(device)  # predicting a real next token
        tokens = tokens.to(device)
        clean, stream = model.run_with_hooks(tokens, capture=streams)
        clean_lp = F.log_softmax(clean[:, :-1].float(), dim=-1)
        clean_sum += _nll(clean_lp, tokens, target_mask).sum().item()
        n += int(target_mask.sum())

        def resumed(site: str, splice: Splice) -> torch.Tensor:
            layer = layer_of[site]
            runner = HookRunner(model.args.n_layers, splice={site: splice})
            return model.forward_from(stream[f"resid_pre.{layer}"], layer, hooks=runner)

        # The positions and massive activations it never saw keep their activation (in the zero ablation
        # too); right padding is spliced too, which no real token sees (causal attention) and no loss counts.
        for site in sites:
            zeroed = resumed(site, Splice(torch.zeros_like, skip_first_positions=skip, sink_norm=sink_norm))
            _accumulate(site_sums[site], "zero", clean_lp, zeroed, tokens, target_mask)
        for target, acc in zip(targets, sums):
            splice = Splice(
                lambda v, t=target: t.reconstruct(v.float()),
                skip_first_positions=skip,
                source=target.source,
                sink_norm=sink_norm,
            )
            _accumulate(acc, "sae", clean_lp, resumed(target.hook_point, splice), tokens, target_mask)
    if n == 0:
        return [{} for _ in targets]
    out = []
    for target, acc in zip(targets, sums):
        ce = {"clean": clean_sum / n, **{k: v / n for k, v in {**acc, **site_sums[target.hook_point]}.items()}}
        denom = ce["zero"] - ce["clean"]
        out.append(
            {
                "eval/ce_clean": ce["clean"],
                "eval/ce_sae": ce["sae"],
                "eval/ce_zero_ablation": ce["zero"],
                "eval/ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if denom else float("nan"),
                "eval/kl_sae": ce["kl_sae"],
                "eval/kl_zero_ablation": ce["kl_zero"],
                "eval/tokens": n,
                "eval/sentences": len(ids),
            }
        )
    return out


def _nll(lp: torch.Tensor, tokens: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """-log p(tokens[:, t+1]) from log-probabilities lp [B, T-1, V], at target_mask positions."""
    return -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)[target_mask]


def _accumulate(acc: dict, key: str, clean_lp, logits, tokens, target_mask) -> None:
    """Add a spliced forward's summed CE (acc[key]) and KL(clean || spliced) (acc["kl_" + key])."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    acc[key] += _nll(lp, tokens, target_mask).sum().item()
    acc["kl_" + key] += (clean_lp.exp() * (clean_lp - lp)).sum(-1)[target_mask].sum().item()
