"""Hook points: the named places in a block where activations are captured or spliced.

A hook point is written `<kind>.<layer>`; inside block L the forward passes them in this order:

    resid_pre.L   residual stream entering block L                              [B, T, d_model]
    attn_norm.L   output of block L's attention RMSNorm (input to q/k/v)         [B, T, d_model]
    attn_out.L    what the attention sub-block adds to the stream (after wo)     [B, T, d_model]
    resid_mid.L   residual stream after the attention sub-block (= pre + attn_out)
    ffn_norm.L    output of block L's feed-forward RMSNorm: the MLP's input      [B, T, d_model]
    mlp_out.L     what the MLP adds to the stream (after w2)                     [B, T, d_model]
    resid_post.L  residual stream leaving block L (= mid + mlp_out = resid_pre.L+1)

Llama Scope's sites are resid_post (R), attn_out (A), mlp_out (M) and the transcoder ffn_norm -> mlp_out (TC).
Capture records the activation as the model computed it (before any splice at the same point).
Splice replaces it by `fn(x)`; with `add_error=True` the SAE-style error term
`x - clean_fn(x)` is added back, so only the difference between `fn` and `clean_fn` (the
intervention, e.g. a steering bias) changes the stream; `clean_fn` defaults to `fn`. A splice with a
`source` reads another, earlier hook point of the same block: a transcoder's splice at mlp_out.L computes
fn(ffn_norm.L), replacing the MLP by its reconstruction (the error term is then mlp_out - clean_fn(ffn_norm)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from llama_3.errors import PipelineInputError

HOOK_KINDS = ("resid_pre", "attn_norm", "attn_out", "resid_mid", "ffn_norm", "mlp_out", "resid_post")


@dataclass(frozen=True, order=True)
class HookPoint:
    """A parsed hook point name; orders by (layer, position inside the block)."""

    layer: int
    stage: int  # index into HOOK_KINDS

    @property
    def kind(self) -> str:
        return HOOK_KINDS[self.stage]

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str, n_layers: int | None = None, flag: str = "hook point") -> "HookPoint":
        kind, _, layer = str(name).partition(".")
        if kind not in HOOK_KINDS or not layer.lstrip("-").isdigit():
            raise PipelineInputError(f"{flag} {name!r}: expected <kind>.<layer> with kind in {', '.join(HOOK_KINDS)}")
        hp = cls(layer=int(layer), stage=HOOK_KINDS.index(kind))
        if n_layers is not None and not 0 <= hp.layer < n_layers:
            raise PipelineInputError(
                f"{flag} {name!r}: layer {hp.layer} is out of range for a model with {n_layers} layers "
                f"(0..{n_layers - 1})"
            )
        return hp


def default_capture_layer(n_layers: int) -> int:
    """About 5/6 of the way through the stack, as the original system chose (25 of SmolLM2's 30). Re-decided
    with time as a criterion (docs/results.md, "Which hook layer"): the middle costs ~0.7x the capture and
    recovers more CE loss, but its latents hardly steer (2% on-concept against 16% here)."""
    return round(n_layers * 5 / 6)


@dataclass
class Splice:
    """Replace the activation at a hook point by `fn(x)` ([B, T, d_model] -> [B, T, d_model])."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    """Any callable, e.g. an SAE's encode-decode with a steering bias."""
    add_error: bool = False
    """Add back x - clean_fn(x), the part of x that `clean_fn` does not reconstruct."""
    clean_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Reconstruction without the intervention, for the error term; defaults to `fn`."""
    skip_first_positions: int = 0
    """Sequence positions < N keep x untouched (e.g. the attention sink an SAE never saw in training)."""
    source: str | None = None
    """fn reads this earlier hook point of the same block instead of x (a transcoder: ffn_norm.L at mlp_out.L)."""
    sink_norm: float = 0.0
    """Positions whose input's norm exceeds this keep x untouched (massive activations an SAE never saw in
    training); 0: none."""

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, source_x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, T, d]; positions [B, T] (each token's position in its own sequence) when known; source_x
        [B, T, d] the `source` hook point's activation (what fn reads when set)."""
        inp = x if self.source is None else source_x
        out = self.fn(inp)
        if out.shape != x.shape:
            raise ValueError(f"splice callable returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        if self.add_error:
            clean = out if self.clean_fn is None else self.clean_fn(inp)
            # x + (out - clean), not out + (x - clean): when the intervention changes nothing,
            # out - clean is exactly 0 and the model sees exactly x (the other order rounds).
            out = x + (out - clean)
        if self.skip_first_positions and positions is not None:
            out = torch.where((positions >= self.skip_first_positions)[..., None], out, x)
        if self.sink_norm:
            out = torch.where((inp.float().norm(dim=-1) > self.sink_norm)[..., None], x, out)
        return out.to(x.dtype)


SpliceSpec = Mapping[str, "Splice | Callable[[torch.Tensor], torch.Tensor]"]


class HookRunner:
    """Per-forward bookkeeping: which hook points to capture or splice, and the captured tensors.

    The model calls `runner(layer, stage, x)` at each hook point of a block that has any hook;
    `blocks_with_hooks` lets it skip the call entirely elsewhere (no per-point overhead).
    """

    def __init__(self, n_layers: int, capture: Iterable[str] = (), splice: SpliceSpec | None = None):
        self.capture_points = {HookPoint.parse(n, n_layers, "capture") for n in capture}
        self.splices: dict[HookPoint, Splice] = {}
        for name, fn in (splice or {}).items():
            hp = HookPoint.parse(name, n_layers, "splice")
            self.splices[hp] = fn if isinstance(fn, Splice) else Splice(fn)
        # a splice's source is read at its own hook point: it must come earlier in the same block
        self.source_of: dict[HookPoint, HookPoint] = {}  # splice point -> the point its fn reads
        for hp, sp in self.splices.items():
            if sp.source is not None:
                src = HookPoint.parse(sp.source, n_layers, "splice source")
                if src.layer != hp.layer or src.stage >= hp.stage:
                    raise PipelineInputError(
                        f"splice at {hp}: its source {src} must be an earlier point of block {hp.layer}"
                    )
                self.source_of[hp] = src
        points = self.capture_points | set(self.splices) | set(self.source_of.values())
        self.blocks_with_hooks = {hp.layer for hp in points}
        self.source_points = set(self.source_of.values())
        self.source_values: dict[HookPoint, torch.Tensor] = {}  # this forward's source activations, until read
        self.captured: dict[str, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        """[B, T] positions of the current forward's tokens, set by the model."""

    @property
    def active(self) -> bool:
        return bool(self.blocks_with_hooks)

    def last_capture_point(self) -> HookPoint | None:
        return max(self.capture_points) if self.capture_points else None

    def __call__(self, layer: int, stage: int, x: torch.Tensor) -> torch.Tensor:
        hp = HookPoint(layer, stage)
        if hp in self.capture_points:
            self.captured[hp.name] = x
        if hp in self.source_points:
            self.source_values[hp] = x
        splice = self.splices.get(hp)
        if splice is None:
            return x
        source = self.source_of.get(hp)
        return splice(x, self.positions, self.source_values.pop(source) if source is not None else None)
