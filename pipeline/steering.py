"""Steering a model through an SAE spliced at its hook point.

Modes, one per entry (several entries at once are fine):
    h_bias  add `strength` to the latent's pre-activation before TopK (the original system's knob)
    clamp   set the latent's activation to `strength` (in the top-k set or not)
    add     add strength x the latent's decoder row to the stream (no encoder involved)

With the error term (default) the model sees x + (x̂_steered - x̂_clean): an entry-free splice is
exactly the clean model, and steering changes the stream by exactly what the SAE changes. Without
it (`keep_error=False`) the model runs on the SAE's reconstruction, to see what the SAE loses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_3.errors import LlamaInputError
from llama_3.hooks import Splice
from sae import TopKSae

MODES = ("h_bias", "clamp", "add")


@dataclass(frozen=True)
class SteeringEntry:
    latent: int
    mode: str
    strength: float

    @staticmethod
    def parse(text: str) -> "SteeringEntry":
        """'LATENT:MODE:STRENGTH', e.g. '1999:clamp:8' (mode defaults to h_bias: '1999:4')."""
        parts = text.split(":")
        try:
            if len(parts) == 2:
                return SteeringEntry(int(parts[0]), "h_bias", float(parts[1]))
            if len(parts) == 3:
                return SteeringEntry(int(parts[0]), parts[1], float(parts[2]))
        except ValueError:
            pass
        raise LlamaInputError(f"--steer {text!r}: expected LATENT:MODE:STRENGTH with MODE one of {', '.join(MODES)}")


def check_entries(sae: TopKSae, entries: list[SteeringEntry]) -> None:
    for e in entries:
        if e.mode not in MODES:
            raise LlamaInputError(f"--steer {e.latent}:{e.mode}:{e.strength}: mode must be one of {', '.join(MODES)}")
        if not 0 <= e.latent < sae.cfg.n_latents:
            raise LlamaInputError(f"--steer {e.latent}: the SAE has latents 0..{sae.cfg.n_latents - 1}")


def steered_reconstruction(sae: TopKSae, x: torch.Tensor, entries: list[SteeringEntry]) -> torch.Tensor:
    """x [..., d] -> the SAE's reconstruction with every entry applied, in the raw space."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    x_norm, ctx = sae.normalize_input(x2)
    h_bias = torch.zeros(sae.cfg.n_latents, device=x.device)
    for e in entries:
        if e.mode == "h_bias":
            h_bias[e.latent] += e.strength
    saved = sae.h_bias.clone()
    try:
        sae.h_bias.copy_(h_bias)
        values, indices = sae.encode(x_norm)
    finally:
        sae.h_bias.copy_(saved)
    x_hat_norm = sae.decode(values, indices)
    for e in entries:
        row = sae.W_dec[e.latent].float()
        if e.mode == "clamp":  # replace the latent's current activation (0 when not in the top k)
            current = (values * (indices == e.latent)).sum(-1, keepdim=True)
            x_hat_norm = x_hat_norm + (e.strength - current) * row
        elif e.mode == "add":
            x_hat_norm = x_hat_norm + e.strength * row
    return sae.denormalize(x_hat_norm, ctx).reshape(shape)


def sae_splice(sae: TopKSae, entries: list[SteeringEntry] = (), keep_error: bool = True,
               position_mask: torch.Tensor | None = None) -> Splice:
    """A Splice for the model's run_with_hooks / generation at sae.cfg.hook_point.

    position_mask [B, T] (optional): where the splice applies; elsewhere the stream is untouched."""
    entries = list(entries)
    check_entries(sae, entries)

    def clean(x):
        return sae(x.reshape(-1, x.shape[-1]).float()).x_hat.reshape(x.shape)

    def steered(x):
        out = steered_reconstruction(sae, x, entries) if entries else clean(x)
        if position_mask is None:
            return out
        outside = x.float() if keep_error else clean(x)  # unsteered there, in either mode
        return torch.where(position_mask[..., None].to(out.device), out, outside)

    def masked_clean(x):
        c = clean(x)
        return c if position_mask is None else torch.where(position_mask[..., None].to(c.device), c, x.float())

    return Splice(steered, add_error=keep_error, clean_fn=masked_clean if keep_error else None)
