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
from pathlib import Path
from typing import Literal, get_args

import torch

from llama_3.checkpoints import LoadedModel, load_model
from llama_3.errors import PipelineInputError
from llama_3.hooks import Splice
from pipeline.interpret.meanings import load_meanings
from pipeline.sae.model import TopKSae, encoder_preacts

Mode = Literal["h_bias", "clamp", "add"]
MODES: tuple[str, ...] = get_args(Mode)


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
        raise PipelineInputError(f"--steer {text!r}: expected LATENT:MODE:STRENGTH with MODE one of {', '.join(MODES)}")


def check_entries(sae: TopKSae, entries: list[SteeringEntry]) -> None:
    for e in entries:
        if e.mode not in MODES:
            raise PipelineInputError(
                f"--steer {e.latent}:{e.mode}:{e.strength}: mode must be one of {', '.join(MODES)}"
            )
        if not 0 <= e.latent < sae.cfg.n_latents:
            raise PipelineInputError(f"--steer {e.latent}: the SAE has latents 0..{sae.cfg.n_latents - 1}")


def _per_row(entries, rows: torch.Tensor | None, n: int, device) -> tuple[list[list[SteeringEntry]], torch.Tensor]:
    """(one entry list per batch row, each token's row [N]); one shared list when rows is None."""
    if rows is None:
        return [list(entries)], torch.zeros(n, dtype=torch.long, device=device)
    return [list(e) for e in entries], rows


def steered_codes(
    sae: TopKSae, x_norm: torch.Tensor, entries, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̃ [N, d] (normalised) -> the SAE's code with h_bias and clamp entries applied:
    (values, indices) [N, k + n_clamp] (JumpReLU: the batch's width w for k).

    `entries`: one list for every token, or, with `rows` [N] (each token's batch row), one list per
    row, so a batch can steer every row differently (the steering evaluation generates all its
    (latent, mode, prompt) rows at once). A clamped latent's own slot is zeroed and the clamp value
    appended as an extra column, so the code decodes to the reconstruction with that latent set to
    the value whether or not TopK kept it."""
    per_row, rows = _per_row(entries, rows, len(x_norm), x_norm.device)
    h_bias = torch.zeros(len(per_row), sae.cfg.n_latents)  # [R, L]
    for r, row_entries in enumerate(per_row):
        for e in row_entries:
            if e.mode == "h_bias":
                h_bias[r, e.latent] += e.strength
    if h_bias.any():
        pre = encoder_preacts(x_norm - sae.b_pre, sae.W_enc, sae.b_enc + sae.h_bias).float()  # [N, L]
        values, indices = sae.activate(pre + h_bias.to(pre.device)[rows])
    else:
        values, indices = sae.encode(x_norm)
    n_clamps = max(sum(e.mode == "clamp" for e in row_entries) for row_entries in per_row)
    for c in range(n_clamps):  # the c-th clamp of each row (-1: that row has none)
        latent, value = torch.full((len(per_row),), -1), torch.zeros(len(per_row))
        for r, row_entries in enumerate(per_row):
            clamps = [e for e in row_entries if e.mode == "clamp"]
            if c < len(clamps):
                latent[r], value[r] = clamps[c].latent, clamps[c].strength
        latent, value = latent.to(x_norm.device)[rows], value.to(x_norm.device)[rows]  # [N]
        values = torch.cat([values.masked_fill(indices == latent[:, None], 0.0), value[:, None].to(values.dtype)], 1)
        indices = torch.cat([indices, latent.clamp(min=0)[:, None]], 1)
    return values, indices


def steered_reconstruction(sae: TopKSae, x: torch.Tensor, entries, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., d] -> the SAE's reconstruction with every entry applied, in the raw space (`entries` and
    `rows` [x.numel() / d] as in steered_codes)."""
    shape = x.shape
    x_norm, ctx = sae.normalize_input(x.reshape(-1, shape[-1]).float())
    values, indices = steered_codes(sae, x_norm, entries, rows)
    x_hat_norm = sae.decode(values, indices)
    if sae.cfg.skip:  # a skip-transcoder's linear path, as in its forward
        x_hat_norm = x_hat_norm + x_norm @ sae.W_skip.t()
    per_row, rows = _per_row(entries, rows, len(x_norm), x_norm.device)
    added = [[e for e in row_entries if e.mode == "add"] for row_entries in per_row]
    if any(added):
        offset = torch.zeros(len(per_row), shape[-1], device=x_norm.device)  # [R, d]
        for r, row_adds in enumerate(added):
            for e in row_adds:
                offset[r] += e.strength * sae.W_dec[e.latent].float()
        x_hat_norm = x_hat_norm + offset[rows]
    out = sae.denormalize(x_hat_norm, ctx)
    sink = sae.sinks(x.reshape(-1, shape[-1]))
    if sink is not None:  # massive activations stay as they are, steered or not
        out = torch.where(sink[:, None], x.reshape(-1, shape[-1]).to(out.dtype), out)
    return out.reshape(shape)


def sae_splice(
    sae: TopKSae,
    entries: list[SteeringEntry] = (),
    keep_error: bool = True,
    position_mask: torch.Tensor | None = None,
    row_entries: list[list[SteeringEntry]] | None = None,
) -> Splice:
    """A Splice for the model's run_with_hooks / generation at sae.cfg.site_hook_point (a transcoder's reads
    its input hook point, the splice's `source`).

    position_mask [B, T] or [B, 1] (a per-row switch, e.g. for steered and unsteered rows in one
    batch): where the steering applies; elsewhere the stream is unsteered (the clean stream with
    the error term, the plain reconstruction without). row_entries: instead of one `entries` list
    for every row, one per batch row (an empty list: that row unsteered). Positions the SAE never saw
    in training (sae.cfg.exclude_first_positions, the attention sink) are always left untouched."""
    entries = list(entries)
    check_entries(sae, entries + [e for row in row_entries or () for e in row])

    def clean(x):
        return sae(x.reshape(-1, x.shape[-1]).float()).x_hat.reshape(x.shape)

    def steered(x):
        if row_entries is not None:
            if len(row_entries) != x.shape[0]:
                raise ValueError(f"row_entries has {len(row_entries)} rows, the batch {x.shape[0]}")
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(x.shape[1])  # [B*T]
            out = steered_reconstruction(sae, x, row_entries, rows)
            # unsteered rows exactly as the clean reconstruction: with the error term they see exactly x
            steering = torch.tensor([bool(r) for r in row_entries], device=x.device)[:, None, None]
            out = torch.where(steering, out, clean(x))
        else:
            out = steered_reconstruction(sae, x, entries) if entries else clean(x)
        if position_mask is None:
            return out
        # outside the mask the clean reconstruction: with the error term, steered - clean is exactly 0 there
        return torch.where(position_mask[..., None].to(out.device), out, clean(x))

    return Splice(
        steered,
        add_error=keep_error,
        clean_fn=clean if keep_error else None,
        skip_first_positions=sae.cfg.tokenization.skip_first_positions,
        source=sae.cfg.hook_point if sae.cfg.is_transcoder else None,
        sink_norm=sae.cfg.sink_norm,
    )


# ---- an SAE loaded next to a model, with its meanings ------------------------------------------


@dataclass
class SteerableSae:
    sae: TopKSae
    directory: Path
    meanings: dict[int, dict]
    """{latent: {"meaning", "certainty", "score", ...}} from latent_index_meaning/ for this SAE."""

    @property
    def hook_point(self) -> str:
        """Where the SAE's splice goes: its hook point, or a transcoder's output hook point."""
        return self.sae.cfg.site_hook_point

    def meaning(self, latent: int) -> str:
        return self.meanings.get(latent, {}).get("meaning", "")

    def search(self, query: str, limit: int = 20) -> list[dict]:
        """Latents whose meaning contains every word of `query` (case-insensitive), best detection score
        first; a number finds that latent."""
        query = query.strip()
        if query.isdigit():
            latent = int(query)
            return (
                [{"latent": latent, **self.meanings.get(latent, {"meaning": ""})}]
                if latent < self.sae.cfg.n_latents
                else []
            )
        words = query.lower().split()
        hits = [
            {"latent": i, **m}
            for i, m in self.meanings.items()
            if all(w in m.get("meaning", "").lower() for w in words)
        ]
        return sorted(hits, key=rank_key)[:limit]

    def best_latents(self, n: int) -> list[int]:
        """The n latents with the highest detection score (ties: higher certainty, then lower id)."""
        return [e["latent"] for e in sorted(({"latent": i, **m} for i, m in self.meanings.items()), key=rank_key)[:n]]


def rank_key(entry: dict) -> tuple:
    """The detection score (validated against hand ratings) first; the explainer's own certainty is not."""
    return (-float(entry.get("score") or 0), -float(entry.get("certainty") or 0), entry["latent"])


def open_steering(
    sae_dir: str | Path,
    model: str | None,
    meanings_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[LoadedModel, SteerableSae]:
    """The SAE at sae_dir, the model it was trained on (or --model, if the same architecture and
    tokenizer), and the SAE's meanings from latent_index_meaning/ (none is fine)."""
    sae = TopKSae.load(sae_dir, device=device).eval()
    lm = load_model(sae.model_path(model, f"--sae {sae_dir}"), device=device, dtype=dtype)
    sae.check_model(lm.identity(), f"--sae {sae_dir}")
    return lm, SteerableSae(sae, Path(sae_dir), load_meanings(meanings_dir, sae.sha256))


def steering_batch(
    sae: TopKSae, prompts: list[list[int]], entries: list[SteeringEntry], keep_error: bool = True, compare: bool = True
) -> tuple[list[list[int]], Splice]:
    """Prompts -> (batch, splice): with `compare`, the batch holds each prompt twice, unsteered rows
    first, so both versions generate side by side in one pass (a per-row switch in the splice)."""
    if not compare:
        return prompts, sae_splice(sae, entries, keep_error)
    rows = torch.tensor([False] * len(prompts) + [True] * len(prompts))
    return prompts + prompts, sae_splice(sae, entries, keep_error, position_mask=rows[:, None])


@torch.inference_mode()
def hook_activations(model, hook_point: str, tokens: list[int]) -> torch.Tensor:
    """One token sequence's activations at the hook point, [T, d] in fp32.

    The hook point's activation at a position depends only on earlier layers, so this clean forward
    up to the hook point is exactly what a splice there saw, steered or not."""
    device = model.tok_embeddings.weight.device
    return model.capture(torch.tensor([tokens], device=device), [hook_point])[hook_point][0].float()


@torch.inference_mode()
def inspect_tokens(
    model, sae: TopKSae, tokens: list[int], entries: list[SteeringEntry] = (), steer_from: int = 0, top: int = 5
) -> list[list[tuple[int, float]]]:
    """Per position of `tokens`: the `top` active latents (id, activation), strongest first, with the
    entries' h_bias / clamp applied at positions >= steer_from (what the steered SAE saw there);
    positions the SAE never saw in training (the attention sink) get an empty list."""
    x = hook_activations(model, sae.cfg.hook_point, tokens)
    x_norm, _ = sae.normalize_input(x)
    values, indices = sae.encode(x_norm)
    if entries and steer_from < len(tokens):
        s_values, s_indices = steered_codes(sae, x_norm[steer_from:], list(entries))
        width = s_values.shape[1]
        pad = width - values.shape[1]
        values = torch.cat([values, values.new_zeros(len(values), pad)], 1)
        indices = torch.cat([indices, indices.new_zeros(len(indices), pad)], 1)
        values[steer_from:], indices[steer_from:] = s_values, s_indices
    order = values.argsort(dim=1, descending=True)[:, :top]
    top_values, top_indices = values.gather(1, order).tolist(), indices.gather(1, order).tolist()
    skip = sae.cfg.tokenization.skip_first_positions
    sink = sae.sinks(x)
    sink = sink.tolist() if sink is not None else [False] * len(tokens)
    return [
        [] if t < skip or sink[t] else [(i, v) for i, v in zip(top_indices[t], top_values[t]) if v > 0]
        for t in range(len(tokens))
    ]
