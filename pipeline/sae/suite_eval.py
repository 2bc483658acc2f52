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

from llama_3.hooks import HookPoint, HookRunner, Splice
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
def long_context_profiles(
    lm, saes: Sequence[TopKSae], sequences: list[list[int]], edges: Sequence[int], batch: int = 4
) -> list[dict]:
    """Each SAE on sequences longer than it was trained on ([n, T] token ids), per position bucket
    [edges[i], edges[i+1]): FVU (squared error over squared deviation from the mean over every spliced
    position) and delta LM loss (per-token CE with the SAE spliced at every position it would be, minus the
    clean CE; the loss at position t predicts token t + 1). Per batch one clean forward serves every SAE; each
    spliced forward resumes at its layer. Memory: per-position sums ([T, d] per SAE), not the activations."""
    model = lm.model
    T = len(sequences[0])
    points = sorted({p for sae in saes for p in (sae.cfg.hook_point, sae.cfg.site_hook_point)})
    layer_of = [HookPoint.parse(sae.cfg.site_hook_point).layer for sae in saes]
    streams = sorted({f"resid_pre.{layer}" for layer in layer_of})
    zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    acc = [{"sq_err": zeros(T), "y_sum": 0.0, "y_sq": zeros(T), "delta": zeros(T - 1)} for _ in saes]
    for a in range(0, len(sequences), batch):
        tokens = torch.tensor(sequences[a : a + batch])
        clean, acts = model.run_with_hooks(tokens, capture=points + streams)
        clean_ce = F.cross_entropy(clean[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
        for sae, layer, sums in zip(saes, layer_of, acc):
            cfg = sae.cfg
            x, y = acts[cfg.hook_point].float(), acts[cfg.site_hook_point].float()  # [b, T, d]; y: what it rebuilds
            y_hat = sae(x.reshape(-1, x.shape[-1])).x_hat.reshape(y.shape)
            sums["sq_err"] += (y_hat - y).double().pow(2).sum(-1).sum(0)
            sums["y_sum"] = sums["y_sum"] + y.double().sum(0)
            sums["y_sq"] += y.double().pow(2).sum(-1).sum(0)
            splice = Splice(
                lambda v, s=sae: s.reconstruct(v.float()),
                skip_first_positions=cfg.tokenization.skip_first_positions,
                source=cfg.hook_point if cfg.is_transcoder else None,
            )
            runner = HookRunner(model.args.n_layers, splice={cfg.site_hook_point: splice})
            spliced = model.forward_from(acts[f"resid_pre.{layer}"], layer, hooks=runner)
            ce = F.cross_entropy(spliced[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
            sums["delta"] += (ce - clean_ce).double().sum(0)
    n = len(sequences)
    out = []
    for sae, sums in zip(saes, acc):
        skip = sae.cfg.tokenization.skip_first_positions
        mean = sums["y_sum"][skip:].sum(0) / (n * (T - skip))  # [d] over every spliced position
        sq_dev = sums["y_sq"] - 2 * (sums["y_sum"] @ mean) + n * mean.pow(2).sum()  # [T]: Σ_b ||y_bt - mean||²
        buckets = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            lo, hi = max(lo, skip), min(hi, T - 1)
            if lo < hi:
                buckets.append(
                    {
                        "positions": [lo, hi],
                        "fvu": float(sums["sq_err"][lo:hi].sum() / sq_dev[lo:hi].sum()),
                        "delta_lm_loss": float(sums["delta"][lo:hi].sum() / (n * (hi - lo))),
                    }
                )
        out.append({"sequences": n, "tokens": T, "buckets": buckets})
    return out


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
