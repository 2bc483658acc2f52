"""CPU fast paths for inference, applied to a built model as a module swap (model.py stays plain PyTorch).

    apply_cpu_fast_paths(lm.model)    # capture, top sentences, generation on CPU do this
    revert_cpu_fast_paths(lm.model)   # back to nn.Linear / SDPA (the benchmark's "unpacked" run)

- `PackedLinear` replaces each block's `nn.Linear`: oneDNN runs the product from the weight reordered
  once into its blocked layout (which dtypes pack on which CPU: llama_3/cpu_features.py). It holds
  the same Parameter as `weight`, so the state dict and autograd see the unchanged model; the packed
  copy is used only without autograd and while the weight is unchanged (its version counter), so
  training or a weight edit silently takes the plain path.
- `GroupedDecodeAttention` replaces each block's `attend`: for a single query step it groups the
  query heads that share a key/value head into one batched matmul (no repeated K/V); SDPA's flash
  kernel costs ~3x this for one bf16 query on CPU. Longer steps go to SDPA as before.

The output projection stays a plain nn.Linear: with tied embeddings it shares the embedding's storage.

oneDNN keeps a primitive per input shape (its primitive cache and ideep's LRU cache, 1,024 entries each by
default, each with its scratchpad): length-sorted batches come in hundreds of shapes, and top sentences' memory
grew 1.3x from 0.25M to 4M tokens with nothing else growing. `apply_cpu_fast_paths` caps both at
ONEDNN_CACHE_ENTRIES (unless the environment sets ONEDNN_PRIMITIVE_CACHE_CAPACITY / LRU_CACHE_CAPACITY), before
the process's first oneDNN op reads them.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from llama_3.cpu_features import can_prepack
from llama_3.model import SdpaAttention, Transformer


class PackedLinear(nn.Module):
    """y = x Wᵀ (no bias) from a oneDNN-prepacked copy of W where that is valid, else F.linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: state dict names and autograd are unchanged
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self._packed_key = self._key()

    def _key(self) -> tuple:
        w = self.weight
        # Inference tensors (made under inference_mode) have no version counter.
        return (-1 if w.is_inference() else w._version, w.dtype, w.data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not grad and x.dtype == self.weight.dtype and x.device.type == "cpu" and self._packed_key == self._key():
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return F.linear(x, self.weight)

    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear


class GroupedDecodeAttention(SdpaAttention):
    """SDPA, except one query step: GQA as a grouped matmul over the heads that share a K/V head."""

    def forward(self, q, k, v, mask, is_causal):
        if q.shape[2] != 1:  # (swapped in on CPU only)
            return super().forward(q, k, v, mask, is_causal)
        # q [B, H, 1, hd], k/v [B, Hkv, S, hd], mask [B|1, 1, 1, S] bool -> [B, H, 1, hd]
        B, H, _, hd = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        qg = q.view(B, Hkv, H // Hkv, hd)  # heads h = g * (H/Hkv) + r share kv head g, as in repeat_interleave
        scores = (qg @ k.transpose(-1, -2)).float() * hd**-0.5  # [B, Hkv, H/Hkv, S]
        if mask is not None:
            scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, S), float("-inf"))
        return (scores.softmax(-1).to(v.dtype) @ v).view(B, H, 1, hd)


def _block_linears(model: Transformer):
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in parent.named_children():
                yield parent, name, child


ONEDNN_CACHE_ENTRIES = 64
"""Cached oneDNN primitives (input shapes) per cache: the memory stays bounded; re-creating one costs ~1 ms."""


def bound_onednn_caches() -> None:
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(ONEDNN_CACHE_ENTRIES))


def apply_cpu_fast_paths(model: Transformer) -> int:
    """Swap in the CPU fast paths (a no-op off CPU); returns how many projections were prepacked."""
    if model.tok_embeddings.weight.device.type != "cpu":
        return 0
    bound_onednn_caches()
    packed = 0
    for parent, name, child in list(_block_linears(model)):
        if isinstance(child, nn.Linear) and can_prepack(child.weight.dtype):
            setattr(parent, name, PackedLinear(child))
            packed += 1
    for block in model.layers:
        block.attention.attend = GroupedDecodeAttention()
    return packed


def revert_cpu_fast_paths(model: Transformer) -> None:
    """Back to plain nn.Linear and SDPA, on the same Parameters."""
    for parent, name, child in list(_block_linears(model)):
        if isinstance(child, PackedLinear):
            setattr(parent, name, child.plain())
    for block in model.layers:
        block.attention.attend = SdpaAttention()
