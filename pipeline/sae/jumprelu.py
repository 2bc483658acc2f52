"""Post-processing a trained TopK SAE into a JumpReLU SAE (Llama Scope's step): one threshold per latent.

TopK is not element-wise: whether latent i fires on a token depends on the other latents' pre-activations, so a
TopK SAE cannot be read latent by latent and has no SAELens transcoder architecture. A JumpReLU SAE fires latent i
wherever pre_i > θ_i. We choose θ_i so that every latent fires as often on calibration tokens as it did under
TopK: if it fired on c_i of the N tokens, θ_i is its (c_i + 1)-th largest pre-activation there, so exactly c_i
tokens exceed it (ties aside). The mean L0 is then k on those tokens, but per token it varies: a token with
many strong latents keeps them all. A latent that never fired gets θ_i = +inf (it stays silent).

Two passes over the calibration tokens, streamed in chunks: the first counts each latent's TopK firings, the
second keeps per latent only its largest pre-activations, at most max(c_i) + 1 <= `max_count` + 1 of them
([m, n_latents] fp32), never the [N, n_latents] matrix.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import write_json_atomic
from pipeline.preprocessing.preprocessed import PreprocessedOutput
from pipeline.sae.formats import load_sae
from pipeline.sae.model import TopKSae, encoder_preacts


@torch.no_grad()
def jumprelu_thresholds(
    sae: TopKSae, chunks: Callable[[], Iterable[torch.Tensor]], max_count: int = 4096
) -> tuple[torch.Tensor, dict]:
    """Per-latent thresholds [L] from calibration activations (`chunks()`: an iterator over raw [n, d] rows at
    the SAE's input hook point, called twice) and a summary: tokens, latents that never fired, latents whose
    count exceeded max_count (their threshold is then the (max_count + 1)-th value: they fire a little less
    often than under TopK)."""
    if sae.cfg.activation != "topk":
        raise PipelineInputError(f"JumpReLU post-processing: the SAE is already {sae.cfg.activation}")
    L = sae.cfg.n_latents

    def preacts():
        for x in chunks():
            x_norm, _ = sae.normalize_input(x.float())
            yield encoder_preacts(sae.encoder_input(x_norm), sae.W_enc, sae.b_enc).float()  # [n, L]

    counts, n = torch.zeros(L, dtype=torch.long), 0
    for pre in preacts():
        values, indices = sae.activate(pre)
        fired = indices[values > 0]
        counts.index_add_(0, fired, torch.ones_like(fired))
        n += len(pre)
    if n == 0:
        raise PipelineInputError("JumpReLU post-processing: no calibration tokens")
    m = min(int(counts.max()) + 1, max_count + 1, n)
    top = torch.full((0, L), float("-inf"))  # [<= m, L] each latent's largest pre-activations so far
    for pre in preacts():
        top = torch.cat([top, pre]).topk(min(m, len(top) + len(pre)), dim=0).values
    rank = counts.clamp(max=max_count)  # θ_i = the (c_i + 1)-th largest value: c_i values lie above it
    rank_in = rank.clamp(max=len(top) - 1)
    thresholds = top.gather(0, rank_in[None, :])[0]
    thresholds = torch.where(counts > 0, thresholds.clamp_min(0.0), torch.full_like(thresholds, float("inf")))
    summary = {
        "calibration_tokens": n,
        "latents_never_fired": int((counts == 0).sum()),
        "latents_capped": int((counts > max_count).sum()),
        "mean_topk_l0": float(counts.sum()) / n,
    }
    return thresholds, summary


def to_jumprelu(sae: TopKSae, thresholds: torch.Tensor) -> TopKSae:
    """A JumpReLU copy of `sae` with these thresholds [L]: the same weights, k = 0, activation jumprelu."""
    cfg = replace(copy.deepcopy(sae.cfg), activation="jumprelu", k=0, topk_by_decoder_norm=False)
    out = TopKSae(cfg)
    state = {k: v for k, v in sae.state_dict().items()}
    state["threshold"] = thresholds.to(sae.W_enc.device, torch.float32)
    out.load_state_dict(state)
    return out.to(sae.W_enc.device)


def convert(sae_dir: str | Path, data: str | Path, out: str | Path, tokens: int = 65536) -> dict:
    """`sae.py jumprelu`: the SAE at sae_dir post-processed on the first `tokens` training rows of the
    preprocessing output `data` (its input hook point's; "": the one it was trained on), written to `out` (an
    SAE folder with jumprelu.json: where the thresholds came from). Returns that record."""
    sae = load_sae(sae_dir).eval()
    data = data or sae.cfg.trained_on.preprocessed
    if not data:
        raise PipelineInputError(f"--sae {sae_dir}: records no training data; pass --data (its input hook's rows)")
    pre = PreprocessedOutput.open(data)
    if pre.hook_point != sae.cfg.hook_point:
        raise PipelineInputError(f"--data {data}: holds {pre.hook_point}, the SAE reads {sae.cfg.hook_point}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineInputError(f"--out {out}: exists and is not an empty folder")
    if tokens < 1:
        raise PipelineInputError(f"--tokens {tokens}: need at least 1")
    rows = pre.reader("train")
    n = min(tokens, len(rows))
    thresholds, summary = jumprelu_thresholds(sae, lambda: (rows[a : min(a + 8192, n)] for a in range(0, n, 8192)))
    jump = to_jumprelu(sae, thresholds)
    jump.save(out)
    record = {
        "source_sae": str(sae_dir),
        "source_sha256": sae.sha256,
        "calibration_data": str(data),
        "calibration_fingerprint": pre.fingerprint,
        "rule": "theta_i = the (c_i + 1)-th largest pre-activation of latent i, c_i its TopK firings",
        **summary,
    }
    write_json_atomic(out / "jumprelu.json", record)
    return record
