"""How much of the model's behaviour an SAE keeps, measured with the SAE spliced into the forward.

For held-out sentences: next-token cross-entropy of the clean model, with the hook point's
activation replaced by the SAE reconstruction, and with it zero-ablated; CE loss recovered =
(CE_zero - CE_sae) / (CE_zero - CE_clean); and KL(clean || spliced) per token (as Gemma Scope and
SAEBench report). Positions the training data excluded (attention sinks) and BOS are left as the
model computed them, so the splice touches exactly the tokens the SAE was trained on.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from llama_3.checkpoints import LoadedModel
from llama_3.hooks import Splice
from pipeline.core.tokenization import Tokenization


def _token_losses(logits: torch.Tensor, tokens: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting tokens[:, t+1] from logits[:, t], at target_mask [B, T-1] positions."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return nll[target_mask]


def _kl(clean: torch.Tensor, other: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    p = F.log_softmax(clean[:, :-1].float(), dim=-1)
    q = F.log_softmax(other[:, :-1].float(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)[target_mask]


@torch.no_grad()
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
    model, tok = lm.model, lm.tokenizer
    device = model.tok_embeddings.weight.device
    ids = tokenization.encode(tok, texts)
    ids = sorted((t for t in ids if len(t) >= 2), key=len)
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n = 0
    # Batches by padded-token budget: three [B, T, vocab] fp32 logits tensors and their log-softmaxes
    # are alive at once (49k vocab: 200 MB each per 1k tokens), the peak memory of the training stage.
    chunks, cur = [], []
    for t in ids:  # sorted by length, so the padded size is (len(cur) + 1) * len(t)
        if cur and (len(cur) + 1) * len(t) > max_batch_tokens:
            chunks.append(cur)
            cur = []
        cur.append(t)
    chunks += [cur] if cur else []
    for chunk in chunks:
        T = max(map(len, chunk))
        tokens = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        for i, t in enumerate(chunk):
            tokens[i, : len(t)] = torch.tensor(t)
        lengths = torch.tensor([len(t) for t in chunk])
        pos = torch.arange(T)[None, :]
        real = pos < lengths[:, None]
        splice_mask = (real & (pos >= tokenization.skip_first_positions)).to(device)  # [B, T]
        target_mask = (pos[:, 1:] < lengths[:, None]).to(device)  # predicting a real next token
        tokens = tokens.to(device)

        def zero_fn(x):
            return torch.where(splice_mask[..., None], torch.zeros_like(x), x)

        # The positions it never saw keep their activation; right padding is spliced too, which no real
        # token sees (causal attention) and no loss counts.
        sae_splice = Splice(
            lambda v: reconstruct(v.float()), skip_first_positions=tokenization.skip_first_positions, source=source
        )
        clean = model(tokens)
        with_sae, _ = model.run_with_hooks(tokens, splice={hook_point: sae_splice})
        zeroed, _ = model.run_with_hooks(tokens, splice={hook_point: zero_fn})
        sums["clean"] += _token_losses(clean, tokens, target_mask).sum().item()
        sums["sae"] += _token_losses(with_sae, tokens, target_mask).sum().item()
        sums["zero"] += _token_losses(zeroed, tokens, target_mask).sum().item()
        sums["kl_sae"] += _kl(clean, with_sae, target_mask).sum().item()
        sums["kl_zero"] += _kl(clean, zeroed, target_mask).sum().item()
        n += int(target_mask.sum())
    if n == 0:
        return {}
    ce = {k: v / n for k, v in sums.items()}
    denom = ce["zero"] - ce["clean"]
    return {
        "eval/ce_clean": ce["clean"],
        "eval/ce_sae": ce["sae"],
        "eval/ce_zero_ablation": ce["zero"],
        "eval/ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if denom else float("nan"),
        "eval/kl_sae": ce["kl_sae"],
        "eval/kl_zero_ablation": ce["kl_zero"],
        "eval/tokens": n,
        "eval/sentences": len(ids),
    }
