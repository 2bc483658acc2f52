"""A pure-PyTorch Llama 3 decoder with capture and splice hooks.

Weight names are Meta's (tok_embeddings, layers.N.attention.wq, feed_forward.w1, ...); Q/K weights
are in Meta's layout, where RoPE rotates interleaved pairs (x[2i], x[2i+1]).

Device- and dtype-agnostic: nothing here picks a device, and `forward` bakes in no
`inference_mode`; callers choose both. Plain nn.Linear and SDPA throughout; the CPU fast paths
(oneDNN-prepacked projections, grouped decode attention) are swapped in by llama_3/cpu_fast.py.
Shapes: B batch, T new tokens, S cached + new tokens, H query heads, Hkv key/value heads, hd head_dim,
D d_model, V vocab.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llama_3.args import ModelArgs, rope_inverse_frequencies
from llama_3.errors import PipelineInputError
from llama_3.hooks import HOOK_KINDS, HookPoint, HookRunner, SpliceSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 squares lose too much), scale in the activation dtype, as Meta does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_freqs_cis(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations e^(i pos freq): inv_freq [hd/2] fp32, positions [B, T] -> complex64 [B, T, 1, hd/2]."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, hd/2]
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, hd] as complex numbers, in fp32 (Meta's way).

    One complex multiply is ~10x faster on CPU than the same rotation spelled with cos/sin.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, T, H, hd/2]
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of past positions, as buffers (so `.to()` moves them) allocated on demand."""

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, hd] at start_pos; return all keys/values so far [B, Hkv, start_pos+T, hd]."""
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise PipelineInputError(f"sequence length {end} exceeds the KV cache ({self.k.shape[2]} positions)")
        b = k.shape[0]
        self.k[:b, :, start_pos:end] = k
        self.v[:b, :, start_pos:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class SdpaAttention(nn.Module):
    """softmax(q kᵀ / sqrt(hd) + mask) v with PyTorch's SDPA: q [B, H, T, hd], k/v [B, Hkv, S, hd] -> [B, H, T, hd].

    A module of its own so that a device's faster kernel can be swapped in (llama_3/cpu_fast.py).
    """

    def forward(self, q, k, v, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        gqa = k.shape[1] != q.shape[1]
        if gqa and mask is not None and q.is_cuda:
            # On CUDA flash attention takes GQA but no mask, memory-efficient attention a mask but no GQA: a
            # padded batch with grouped kv heads would fall to the math kernel, which materialises [B, H, T, S]
            # scores. Expanding the kv heads ([B, H, S, hd]) keeps it on memory-efficient attention.
            rep = q.shape[1] // k.shape[1]
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.attend = SdpaAttention()
        self.cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None, start_pos: int
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, hd]
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # [B, Hkv, S, hd]
        elif start_pos:
            raise ValueError("start_pos > 0 needs a KV cache (call allocate_kv_cache first)")
        # Without padding, a fresh sequence is plain causal and a one-token step sees every cached key.
        out = self.attend(q, k, v, mask, is_causal=mask is None and T > 1)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place: saves two [B, T, hidden_dim] allocations per block (not under autograd recording).
        if torch.is_grad_enabled() and x.requires_grad:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.silu(self.w1(x), inplace=True).mul_(self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x, freqs_cis, mask, start_pos, hooks: HookRunner | None = None, stop_stage: int | None = None
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. With `stop_stage`, return right after that hook point (capture-only)."""
        if hooks is None or self.layer_id not in hooks.blocks_with_hooks:
            h = x + self.attention(self.attention_norm(x), freqs_cis, mask, start_pos)
            return h + self.feed_forward(self.ffn_norm(h))
        L = self.layer_id
        x = hooks(L, 0, x)  # resid_pre
        if stop_stage == 0:
            return x
        xn = hooks(L, 1, self.attention_norm(x))  # attn_norm
        if stop_stage == 1:
            return x
        a = hooks(L, 2, self.attention(xn, freqs_cis, mask, start_pos))  # attn_out
        if stop_stage == 2:
            return x
        x = hooks(L, 3, x + a)  # resid_mid
        if stop_stage == 3:
            return x
        xn = hooks(L, 4, self.ffn_norm(x))  # ffn_norm: the MLP's input
        if stop_stage == 4:
            return x
        m = hooks(L, 5, self.feed_forward(xn))  # mlp_out
        if stop_stage == 5:
            return x
        return hooks(L, 6, x + m)  # resid_post


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not a buffer: `model.to(bfloat16)` must not round the RoPE frequencies. Moved to the
        # tokens' device on first use.
        self._rope_inv_freq = torch.tensor(rope_inverse_frequencies(args), dtype=torch.float32, device="cpu")

    def rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._rope_inv_freq.device != device:
            self._rope_inv_freq = self._rope_inv_freq.to(device)
        return self._rope_inv_freq

    # ---- KV cache -------------------------------------------------------------------------
    def allocate_kv_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate per-layer K/V buffers for `batch_size` sequences of up to `max_seq_len` tokens."""
        if max_seq_len > self.args.max_seq_len:
            raise PipelineInputError(
                f"max_seq_len {max_seq_len} exceeds the model's context of {self.args.max_seq_len} tokens"
            )
        w = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(
                batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim, w.dtype, w.device
            )

    def share_cache_prefix(self, length: int) -> None:
        """Copy batch row 0's first `length` cache slots to every row: a prompt prefilled once (batch of 1)
        continues as many rows (e.g. many continuations of one prompt read back at once)."""
        for layer in self.layers:
            cache = layer.attention.cache
            cache.k[1:, :, :length] = cache.k[:1, :, :length]
            cache.v[1:, :, :length] = cache.v[:1, :, :length]

    def free_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    # ---- forward ---------------------------------------------------------------------------
    def _prepare(self, tokens, start_pos, positions, key_valid):
        """Embeddings, RoPE angles and the attention mask shared by every block."""
        freqs_cis, mask, positions = self._attention_inputs(
            tokens.shape, tokens.device, start_pos, positions, key_valid
        )
        return self.tok_embeddings(tokens), freqs_cis, mask, positions

    def _attention_inputs(self, shape, device, start_pos, positions, key_valid):
        B, T = shape
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=device).expand(B, T)
        if start_pos + T > self.args.max_seq_len:
            raise PipelineInputError(
                f"sequence of {start_pos + T} tokens exceeds the model's context of {self.args.max_seq_len}"
            )
        freqs_cis = rope_freqs_cis(self.rope_inv_freq(device), positions)
        mask = None
        if key_valid is not None or (start_pos > 0 and T > 1):
            # Boolean mask [B|1, 1, T, S]: causal over cache slots, minus padded keys. Every query may
            # always see its own slot, so rows of padding stay finite instead of NaN (a NaN value there
            # would leak into real rows through 0 * NaN in softmax @ V).
            S = start_pos + T
            q_slot = torch.arange(start_pos, S, device=device)[:, None]
            k_slot = torch.arange(S, device=device)[None, :]
            mask = (k_slot <= q_slot)[None, None]
            if key_valid is not None:
                mask = mask & (key_valid[:, None, None, :S] | (k_slot == q_slot)[None, None])
        return freqs_cis, mask, positions

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        *,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        hooks: HookRunner | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] in the model's dtype (or [B, 1, V] with `last_only`).

        start_pos: cache slot of tokens[:, 0] (needs `allocate_kv_cache` when > 0).
        positions: RoPE positions [B, T]; defaults to start_pos + arange(T). Left-padded batches pass
            slot - n_pad so every sequence starts at position 0.
        key_valid: [B, S] bool, False for padded slots that no query may attend to.
        hooks: a HookRunner for capture/splice (see llama_3.hooks).
        """
        x, freqs_cis, mask, positions = self._prepare(tokens, start_pos, positions, key_valid)
        if hooks is not None:
            hooks.positions = positions
        for layer in self.layers:
            x = layer(x, freqs_cis, mask, start_pos, hooks)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))

    def forward_from(
        self,
        x: torch.Tensor,
        layer: int,
        *,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        last_only: bool = False,
        mid: bool = False,
        hooks: HookRunner | None = None,
    ) -> torch.Tensor:
        """x [B, T, D], the stream at resid_pre.<layer> (block `layer`'s input; with `mid`, at resid_mid.<layer>,
        so block `layer` runs only its MLP) -> logits, running only blocks layer.. (no cache). The counterpart
        of `capture`: a clean prefix computed once, then many edited streams (e.g. one steering vector per row)
        run through the rest of the model (`hooks`: splices and captures at the later points)."""
        freqs_cis, mask, positions = self._attention_inputs(x.shape[:2], x.device, 0, positions, key_valid)
        if hooks is not None:
            hooks.positions = positions
        if mid:
            block = self.layers[layer]
            x = x + block.feed_forward(block.ffn_norm(x))
            layer += 1
        for block in self.layers[layer:]:
            x = block(x, freqs_cis, mask, 0, hooks)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))

    def run_with_hooks(
        self, tokens: torch.Tensor, capture: Iterable[str] = (), splice: SpliceSpec | None = None, **kwargs
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full forward with captures and splices: returns (logits, {hook point: activation [B, T, D]})."""
        runner = HookRunner(self.args.n_layers, capture, splice)
        logits = self(tokens, hooks=runner, **kwargs)
        return logits, runner.captured

    def capture(
        self,
        tokens: torch.Tensor,
        hook_points: Iterable[str],
        *,
        splice: SpliceSpec | None = None,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Capture-only forward: run blocks only up to the last requested hook point.

        No later block, no final norm, no output projection is computed. Returns
        {hook point: activation [B, T, D]} in the model's dtype.
        """
        runner = HookRunner(self.args.n_layers, hook_points, splice)
        last: HookPoint | None = runner.last_capture_point()
        if last is None:
            raise PipelineInputError("capture: no hook point requested")
        x, freqs_cis, mask, runner.positions = self._prepare(tokens, 0, positions, key_valid)
        for layer in self.layers[: last.layer]:
            x = layer(x, freqs_cis, mask, 0, runner)
        if last.stage == 0:  # resid_pre.L is block L's input: block L itself never runs
            runner(last.layer, 0, x)
        else:
            self.layers[last.layer](x, freqs_cis, mask, 0, runner, stop_stage=last.stage)
        return runner.captured


__all__ = ["Transformer", "ModelArgs", "KVCache", "RMSNorm", "apply_rotary_emb", "rope_freqs_cis", "HOOK_KINDS"]
