"""A suite of SAEs judged together, as Llama Scope and Gemma Scope report theirs: one row per SAE (explained
variance, L0, dead latents, CE loss recovered, delta LM loss), the long-context check (reconstruction and delta
loss by token position, past the context the SAEs were trained on), and feature splitting across two widths.

Definitions, the same for every SAE:
- FVU: squared error / squared deviation from the training tokens' mean, over the validation tokens (a
  transcoder's: of its target); explained variance = 1 - FVU.
- dead: the share of latents that never fire on the validation tokens.
- delta LM loss: CE with the SAE spliced in (a transcoder replacing the MLP) - the clean CE, on held-out sentences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from llama_3.hooks import HookPoint, Splice
from pipeline.sae.model import TopKSae
from pipeline.sae.training_run import TrainingRun


def suite_row(run_dir: str | Path) -> dict:
    """One SAE's numbers from its training run folder's manifest."""
    run = TrainingRun.open(run_dir)
    cfg = run.manifest["sae"]
    val, spliced = run.final_validation, run.spliced_evaluation
    hook = HookPoint.parse(cfg["hook_point"])
    site = (
        "TC"
        if cfg.get("output_hook_point")
        else {"resid_post": "R", "attn_out": "A", "mlp_out": "M"}.get(hook.kind, hook.kind)
    )
    ce_sae, ce_clean = spliced.get("eval/ce_sae"), spliced.get("eval/ce_clean")
    return {
        "run": str(run_dir),
        "hook_point": cfg["hook_point"],
        "output_hook_point": cfg.get("output_hook_point", ""),
        "layer": hook.layer,
        "site": site,
        "expansion": cfg["n_latents"] // cfg["d_model"],
        "n_latents": cfg["n_latents"],
        "k": cfg["k"],
        "fvu": val.get("val/fvu"),
        "explained_variance": 1 - val["val/fvu"] if "val/fvu" in val else None,
        "l0": val.get("val/l0"),
        "dead_pct": val.get("val/dead_pct"),
        "ce_loss_recovered": spliced.get("eval/ce_loss_recovered"),
        "delta_lm_loss": ce_sae - ce_clean if ce_sae is not None and ce_clean is not None else None,
        "kl": spliced.get("eval/kl_sae"),
        "train_tokens_per_s": run.manifest.get("throughput", {}).get("tokens_per_s"),
    }


def long_sequences(tokenizer, texts: Sequence[str], length: int, n: int) -> list[list[int]]:
    """n token sequences of exactly `length` tokens, each consecutive sentences of `texts` joined by spaces (a
    document's running text, longer than any one sentence the SAEs were trained on)."""
    out, cur = [], []
    for text in texts:
        cur += tokenizer.encode(" " + text if cur else text)
        if len(cur) >= length:
            out.append(cur[:length])
            cur = []
            if len(out) == n:
                break
    return out


@torch.no_grad()
def long_context_profile(lm, sae: TopKSae, sequences: list[list[int]], edges: Sequence[int], batch: int = 4) -> dict:
    """The SAE on sequences longer than it was trained on ([n, T] token ids), per position bucket
    [edges[i], edges[i+1]): FVU (squared error over squared deviation from the mean over every position) and
    delta LM loss (per-token CE with the SAE spliced at every position it would be, minus the clean CE; the loss
    at position t predicts token t + 1). Memory: per-position sums ([T, d]), not the activations."""
    model, cfg = lm.model, sae.cfg
    site, source = cfg.site_hook_point, (cfg.hook_point if cfg.is_transcoder else None)
    skip = cfg.tokenization.skip_first_positions
    T = len(sequences[0])
    sq_err = torch.zeros(T, dtype=torch.float64)
    y_sum, y_sq = None, torch.zeros(T, dtype=torch.float64)  # [T, d] and [T] over sequences
    delta = torch.zeros(T - 1, dtype=torch.float64)
    splice = Splice(lambda v: sae.reconstruct(v.float()), skip_first_positions=skip, source=source)
    for a in range(0, len(sequences), batch):
        tokens = torch.tensor(sequences[a : a + batch])
        acts = model.capture(tokens, [cfg.hook_point] + ([site] if source else []))
        x = acts[cfg.hook_point].float()  # [b, T, d]
        y = acts[site].float() if source else x  # what the SAE reconstructs
        y_hat = sae(x.reshape(-1, x.shape[-1])).x_hat.reshape(y.shape)
        sq_err += (y_hat - y).double().pow(2).sum(-1).sum(0)
        y_sum = y.double().sum(0) if y_sum is None else y_sum + y.double().sum(0)
        y_sq += y.double().pow(2).sum(-1).sum(0)
        clean = model(tokens)
        spliced, _ = model.run_with_hooks(tokens, splice={site: splice})
        ce = [
            F.cross_entropy(lg[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
            for lg in (clean, spliced)
        ]
        delta += (ce[1] - ce[0]).double().sum(0)
    n = len(sequences)
    mean = y_sum[skip:].sum(0) / (n * (T - skip))  # [d] over every spliced position
    sq_dev = y_sq - 2 * (y_sum @ mean) + n * mean.pow(2).sum()  # [T]: Σ_b ||y_bt - mean||²
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        lo, hi = max(lo, skip), min(hi, T - 1)
        if lo < hi:
            buckets.append(
                {
                    "positions": [lo, hi],
                    "fvu": float(sq_err[lo:hi].sum() / sq_dev[lo:hi].sum()),
                    "delta_lm_loss": float(delta[lo:hi].sum() / (n * (hi - lo))),
                }
            )
    return {"sequences": n, "tokens": T, "buckets": buckets}


@dataclass
class Splitting:
    """Each wide latent's nearest narrow latent by decoder cosine."""

    parent: torch.Tensor  # [L_wide] the nearest narrow latent
    cosine: torch.Tensor  # [L_wide] its decoder cosine

    def children(self, min_cosine: float) -> dict[int, list[int]]:
        """{narrow latent: its wide latents (cosine >= min_cosine)}, most children first."""
        out: dict[int, list[int]] = {}
        for w, (p, c) in enumerate(zip(self.parent.tolist(), self.cosine.tolist())):
            if c >= min_cosine:
                out.setdefault(p, []).append(w)
        return dict(sorted(out.items(), key=lambda kv: (-len(kv[1]), kv[0])))


@torch.no_grad()
def feature_splitting(narrow: TopKSae, wide: TopKSae, chunk: int = 4096) -> Splitting:
    """Match every wide latent to the narrow latent whose decoder row is most aligned (cosine, in chunks of wide
    rows: never the [L_wide, L_narrow] matrix at once)."""
    a = F.normalize(narrow.W_dec.float(), dim=1)  # [L_n, d]
    parents, cosines = [], []
    for w in F.normalize(wide.W_dec.float(), dim=1).split(chunk):
        best = (w @ a.t()).max(dim=1)
        parents.append(best.indices)
        cosines.append(best.values)
    return Splitting(torch.cat(parents), torch.cat(cosines))
