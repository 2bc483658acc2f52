"""TopK sparse autoencoder with a fast sparse path and a dense reference path.

    h  = TopK(W_enc (x̃ - b_pre) + b_enc + h_bias)      ReLU on the kept values; h_bias steers (not trained)
    x̂  = W_dec^T h + b_pre                              each latent's decoder row W_dec[i] has unit norm

x̃ is the normalised input: "dataset" divides every token by one scalar so that E||x̃||² = d_model
(the default: it keeps the geometry between tokens, and undoing it is one multiply), "token"
standardises each token on its own (the original system's choice), "none" leaves x alone.

Shapes: N tokens, d = d_model, L = n_latents, k active latents per token.
Fast path: the decoder sums only the k active rows (`embedding_bag`; backward via a sparse matmul), and the
encoder's backward uses only the k active entries of its gradient (a sparse [N, L] matrix), so neither pass touches the
N x L dense latent matrix after the forward's matmul. The dense path computes the same thing with
plain matmuls and is kept as the reference the tests compare against.

Imported SAEs may be JumpReLU instead (`activation="jumprelu"`, inference only): h_i = pre_i where pre_i exceeds
its threshold (and 0), so the number of active latents varies per token; a batch's code is then as wide as its
busiest token, padded with value-0 entries (see `activate`). A plain ReLU SAE is JumpReLU with threshold 0.

Files: `sae.safetensors` + `cfg.json` (everything needed to rebuild, incl. normalisation statistics,
hook point and model identity); `export_saelens()` writes SAELens' `cfg.json` + `sae_weights.safetensors`,
`export_sparsify()` sparsify's `cfg.json` + `sae.safetensors`; `TopKSae.load` also reads both layouts.

Usage (export):
    python sae.py export --format sparsify --out exports     # -> exports/layers.24 for a resid_pre.25 SAE
    python sae.py export --format saelens --sae runs/sae/sae --out exports/saelens [--unit-decoder]
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llama_3.cpu_features import can_prepack
from llama_3.errors import PipelineInputError
from llama_3.hooks import HookPoint
from pipeline.core.manifest import atomic_path
from pipeline.core.tokenization import DEFAULT_MAX_TOKENS, Tokenization

Normalize = Literal["dataset", "token", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalize)
Activation = Literal["topk", "jumprelu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
ENCODER_INIT_NORM = 3**-0.5
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose cfg.json layout export_saelens writes (6.x: a `metadata` block)."""
TRANSFORMERLENS_HOOKS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post"}
"""Our hook kinds -> TransformerLens' hook in blocks.<layer> (the value at each is the same tensor)."""
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class SaeConfig:
    d_model: int
    """Width of the activations (the model's residual stream)."""
    n_latents: int
    """Dictionary size."""
    k: int
    """Active latents per token (TopK); 0 for JumpReLU, where the count varies per token."""
    normalize: str = "dataset"
    """Input normalisation: dataset (one scalar), token (per-token standardisation) or none."""
    input_scale: float = 1.0
    """For "dataset": x̃ = x * input_scale, chosen so that E||x̃||² = d_model on the training data."""
    hook_point: str = ""
    """Where the activations were captured (e.g. resid_pre.25)."""
    model: dict = field(default_factory=dict)
    """Identity of the model the SAE was trained on (path, kind, config/tokenizer hashes)."""
    exclude_first_positions: int = 0
    """Text positions the training data excluded (attention sinks); later stages apply the same rule."""
    add_bos: bool = False
    """The training capture prepended BOS (never stored): later stages feed the SAE the same sequences."""
    max_tokens: int = DEFAULT_MAX_TOKENS
    """Text tokens per sentence the training capture kept (BOS on top)."""
    activation: Activation = "topk"
    """topk: the k largest pre-activations, ReLU'd (what sae_training trains). jumprelu: every latent whose
    pre-activation exceeds its own `threshold` (and 0) keeps it: Gemma Scope / Llama Scope SAEs, and plain
    ReLU SAEs with threshold 0; inference only (imported, never trained here)."""

    @property
    def tokenization(self) -> Tokenization:
        """How a sentence becomes the token sequence this SAE was trained on."""
        return Tokenization(self.add_bos, self.max_tokens, self.exclude_first_positions)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise PipelineInputError(f"SAE config: activation={self.activation!r}, expected one of {ACTIVATIONS}")
        if self.activation == "topk" and not 0 < self.k <= self.n_latents:
            raise PipelineInputError(f"SAE config: k={self.k} must be in 1..n_latents={self.n_latents}")
        if self.activation == "jumprelu" and self.k != 0:
            raise PipelineInputError(f"SAE config: k={self.k} with jumprelu (its count varies per token; k must be 0)")
        if self.normalize not in NORMALIZATIONS:
            raise PipelineInputError(f"SAE config: normalize={self.normalize!r}, expected one of {NORMALIZATIONS}")


@dataclass
class SaeOutput:
    x_hat: torch.Tensor  # [N, d] reconstruction in the input's (raw) space
    values: torch.Tensor  # [N, k] post-ReLU activations of the active latents (JumpReLU: [N, w], see encode)
    indices: torch.Tensor  # [N, k] their latent ids, distinct within a row
    x_norm: torch.Tensor  # [N, d] the normalised input the SAE saw
    x_hat_norm: torch.Tensor  # [N, d] the reconstruction in normalised space


def encoder_preacts(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [N, d] @ W[L, d]^T + b -> [N, L], in the autocast dtype when autocast is on.

    On CPU the weight is reordered for oneDNN on every call: the reorder touches L*d values, the
    matmul N*L*d multiply-adds, and the packed fp32 matmul ran ~2x faster than addmm on AMD EPYC
    (bench/bench_sae.py). The weight changes every step, so nothing is cached.
    """
    if x.device.type == "cpu":
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if can_prepack(dtype):  # not bf16 where oneDNN has no bf16 path: addmm then emulates it
            x, W, b = x.to(dtype).contiguous(), W.to(dtype), b.to(dtype)
            return torch.ops.mkldnn._linear_pointwise(
                x, torch.ops.mkldnn._reorder_linear_weight(W, None), b, "none", [], ""
            )
    return torch.addmm(b, x, W.t())


def _token_major(indices: torch.Tensor, values: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse [N, L] latent matrix as CSR (row n: the k entries of token n, columns sorted),
    and the [N, k] permutation that sorted each row."""
    N, k = indices.shape
    indices, order = indices.sort(dim=1)  # CSR wants each row's columns in order
    crow = torch.arange(0, N * k + 1, k, device=indices.device)
    csr = torch.sparse_csr_tensor(
        crow, indices.reshape(-1), values.gather(1, order).reshape(-1), (N, n_latents), check_invariants=False
    )
    return csr, order


def _latent_major(indices: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Its transpose [L, N] as CSR: one row per latent listing the tokens it is active on."""
    N, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)  # stable: tokens stay in order within a latent's row
    crow = torch.zeros(n_latents + 1, dtype=torch.long, device=indices.device)
    # index_add_, not bincount: bincount sizes its output by the largest index, a host sync on a GPU
    crow[1:] = torch.zeros_like(crow[1:]).index_add_(0, flat, torch.ones_like(flat)).cumsum(0)
    return torch.sparse_csr_tensor(crow, order // k, values.reshape(-1)[order], (n_latents, N), check_invariants=False)


class _SparseEncoderGrad(torch.autograd.Function):
    """Top-k of W_enc x + b whose backward only uses the k kept entries per token.

    forward: x [N, d], W [L, d], b [L] -> values [N, k] (ReLU'd), indices [N, k]
    backward: grad_values [N, k] -> a sparse [N, L] gradient G with N*k entries;
              dx = G @ W, dW = Gᵀ @ x, db = column sums of G (CSR matmuls: N*k*d work).
    """

    @staticmethod
    def forward(ctx, x, W, b, h_bias, k):
        pre = encoder_preacts(x, W, b + h_bias)  # [N, L]
        top, idx = pre.topk(k, dim=-1, sorted=False)
        values = top.relu()
        ctx.save_for_backward(x, W, idx, values)
        return values, idx

    @staticmethod
    def backward(ctx, grad_values, _grad_idx):
        x, W, idx, values = ctx.saved_tensors
        n_latents = W.shape[0]
        g = (grad_values * (values > 0)).to(x.dtype)  # ReLU; fp32 even when autocast made the values bf16
        grad_x = _token_major(idx, g, n_latents)[0] @ W if ctx.needs_input_grad[0] else None
        grad_W = _latent_major(idx, g, n_latents) @ x if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(n_latents, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_W, grad_b if ctx.needs_input_grad[2] else None, None, None


class _SparseDecode(torch.autograd.Function):
    """Σ_j values[n, j] · W[indices[n, j]]  ([N, k] x [L, d] -> [N, d]) with a sparse backward.

    embedding_bag computes the same forward, but its backward materialises one [N*k, d] row per
    index (302 MB at N 4096, k 32, d 576; 77 GB for an aux-k pass with k_aux 1536 at d 3072).
    Here d values[n, j] = grad_out[n] · W[indices[n, j]] is a sampled dense-dense product (SDDMM)
    and dW = Gᵀ @ grad_out a CSR matmul: nothing larger than the [N, k] and [L, d] results exists.
    """

    @staticmethod
    def forward(ctx, values, indices, W):
        ctx.save_for_backward(values, indices, W)
        return F.embedding_bag(indices, W, per_sample_weights=values.to(W.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W = ctx.saved_tensors
        n_latents = W.shape[0]
        grad_out = grad_out.to(W.dtype)
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            pattern, order = _token_major(indices, torch.zeros_like(indices, dtype=W.dtype), n_latents)
            sampled = torch.sparse.sampled_addmm(pattern, grad_out, W.t(), beta=0.0)  # [N, L] CSR on the pattern
            # Products come in each row's sorted order; scatter them back to the caller's order.
            grad_values = torch.empty_like(order, dtype=W.dtype).scatter_(1, order, sampled.values().view_as(order))
            grad_values = grad_values.to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = _latent_major(indices, values.to(W.dtype), n_latents) @ grad_out  # [L, d]
        return grad_values, None, grad_W


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(values, indices) [N, k] over decoder rows W [L, d] -> [N, d], no b_pre."""
    return _SparseDecode.apply(values, indices, W)


def write_sae_folder(directory: str | Path, weights_name: str, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
    """directory/weights_name (safetensors; tensors contiguous, on the CPU) and directory/cfg.json, each atomic:
    our own layout and the SAELens / sparsify exports."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / weights_name) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    with atomic_path(directory / "cfg.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2))


def read_weights(path: Path, names: dict[str, str], layout: str) -> dict[str, torch.Tensor]:
    """{our name: fp32 tensor} from a safetensors file that stores them under `names` (ours -> its);
    an unreadable file or a missing tensor is one line naming the file."""
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise PipelineInputError(f"{path}: cannot be read ({str(e).splitlines()[0]})") from None
    try:
        return {ours: sd[theirs].float() for ours, theirs in names.items()}
    except KeyError as e:
        raise PipelineInputError(f"{path}: no {e} (not {layout} layout)") from None


class TopKSae(nn.Module):
    def __init__(self, cfg: SaeConfig):
        super().__init__()
        self.cfg = cfg
        d, L = cfg.d_model, cfg.n_latents
        W_dec = torch.randn(L, d)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [L, d]: one unit-norm row per latent
        # Encoder = the decoder's transpose, rows scaled to 1/sqrt(3) (the row norm nn.Linear's default
        # init gives, as sparsify starts): the smaller start lowers FVU after one pass from 0.19 to 0.15
        # on the SmolLM2 benchmark (bench/bench_sae.py; unit rows start with pre-activations too large).
        self.W_enc = nn.Parameter(W_dec * ENCODER_INIT_NORM)
        self.b_enc = nn.Parameter(torch.zeros(L))
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.register_buffer("h_bias", torch.zeros(L), persistent=False)  # steering; never trained
        if cfg.activation == "jumprelu":
            self.register_buffer("threshold", torch.zeros(L))  # [L] each latent's jump point

    # ---- normalisation --------------------------------------------------------------------
    def normalize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        if self.cfg.normalize == "dataset":
            return x * self.cfg.input_scale, ()
        if self.cfg.normalize == "token":
            mu = x.mean(-1, keepdim=True)
            sd = x.std(-1, keepdim=True) + 1e-5
            return (x - mu) / sd, (mu, sd)
        return x, ()

    def denormalize(self, x_norm: torch.Tensor, ctx: tuple) -> torch.Tensor:
        if self.cfg.normalize == "dataset":
            return x_norm / self.cfg.input_scale
        if self.cfg.normalize == "token":
            mu, sd = ctx
            return x_norm * sd + mu
        return x_norm

    # ---- encode / decode ------------------------------------------------------------------
    def activate(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations [N, L] -> the code (values [N, w], indices [N, w]), indices distinct within a row.

        TopK: w = k. JumpReLU: w = the most latents active on any token of this batch (at least 1), so
        one batch is one dense-width code without truncation; a row with fewer active latents is padded
        with value-0 entries of inactive latents, which decode, aggregate and rank as nothing."""
        if self.cfg.activation == "topk":
            top, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return top.relu(), idx
        active = (pre > self.threshold) & (pre > 0)  # SAELens: ReLU(pre) * (pre > threshold)
        width = max(1, int(active.sum(1).max())) if len(pre) else 1
        return pre.where(active, 0.0).topk(min(width, pre.shape[1]), dim=-1, sorted=False)

    def encode(self, x_norm: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x̃ [N, d] -> (values [N, k], indices [N, k]) (JumpReLU: [N, w], see activate)."""
        xc = x_norm - self.b_pre
        if dense:
            return self.activate(xc @ self.W_enc.t() + self.b_enc + self.h_bias)
        if self.cfg.activation != "topk":  # inference only: no sparse backward needed
            return self.activate(encoder_preacts(xc, self.W_enc, self.b_enc + self.h_bias))
        return _SparseEncoderGrad.apply(xc, self.W_enc, self.b_enc, self.h_bias, self.cfg.k)

    def decode(self, values: torch.Tensor, indices: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """(values, indices) [N, k] -> x̂ in normalised space [N, d]."""
        if dense:
            h = torch.zeros(values.shape[0], self.cfg.n_latents, dtype=values.dtype, device=values.device)
            h = h.scatter(1, indices, values)
            return h @ self.W_dec + self.b_pre
        # Sum of the k active decoder rows, weighted by their activations: never forms [N, L].
        return sparse_decode(values, indices, self.W_dec) + self.b_pre

    def decode_residual(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Decode without b_pre (the aux-k reconstruction models the residual x̃ - x̂)."""
        return sparse_decode(values, indices, self.W_dec)

    def forward(self, x: torch.Tensor, dense: bool = False) -> SaeOutput:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_norm, ctx = self.normalize_input(x2)
        values, indices = self.encode(x_norm, dense)
        x_hat_norm = self.decode(values, indices, dense)
        x_hat = self.denormalize(x_hat_norm, ctx)
        return SaeOutput(x_hat.reshape(shape), values, indices, x_norm, x_hat_norm)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> x̂ [..., d] in raw space: the callable a splice uses."""
        return self(x).x_hat

    # ---- decoder constraints --------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Each latent's decoder row back to unit norm (after every optimizer step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each row's gradient its component along that row (before the optimizer step).

        g_i <- g_i - (g_i . w_i) / (w_i . w_i) w_i: moving along w_i would only change its norm,
        which normalize_decoder undoes anyway (dividing by w_i . w_i keeps it exact when the
        rows are only unit-norm up to rounding).
        """
        g = self.W_dec.grad
        if g is not None:
            w = self.W_dec
            g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w

    # ---- files ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        write_sae_folder(directory, "sae.safetensors", self.state_dict(), asdict(self.cfg))

    @staticmethod
    def load(directory: str | Path, device: str | torch.device = "cpu") -> "TopKSae":
        directory = Path(directory)
        try:
            raw = json.loads((directory / "cfg.json").read_text())
            if isinstance(raw, dict) and "d_sae" in raw and (directory / "sae_weights.safetensors").is_file():
                return TopKSae.load_saelens(directory, raw, device)
            if isinstance(raw, dict) and "d_in" in raw and "d_model" not in raw:
                return TopKSae.load_sparsify(directory, raw, device)
            cfg = SaeConfig(**raw)
        except FileNotFoundError:
            raise PipelineInputError(f"{directory / 'cfg.json'}: file not found (not an SAE folder?)") from None
        except (TypeError, json.JSONDecodeError) as e:
            raise PipelineInputError(f"{directory / 'cfg.json'}: not an SAE config ({e})") from None
        sae = TopKSae(cfg)
        try:
            sd = load_file(str(directory / "sae.safetensors"))
        except Exception as e:
            raise PipelineInputError(
                f"{directory / 'sae.safetensors'}: cannot be read ({str(e).splitlines()[0]})"
            ) from None
        missing, unexpected = sae.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise PipelineInputError(
                f"{directory / 'sae.safetensors'}: weights {missing or unexpected} do not match cfg.json"
            )
        return sae.to(device)

    @staticmethod
    def load_sparsify(directory: Path, raw: dict, device: str | torch.device = "cpu") -> "TopKSae":
        """(From load, with `raw` its parsed cfg.json.) An SAE in EleutherAI sparsify's layout
        (SparseCoder.save_to_disk: cfg.json with d_in, num_latents
        or expansion_factor, k; sae.safetensors with encoder.weight [L, d], encoder.bias, W_dec [L, d],
        b_dec), for inference: the same forward on raw activations (normalize "none"). sparsify names a
        hookpoint by its folder: "layers.N" is the output of decoder layer N, our resid_post.N. It records
        no model, BOS or excluded positions: pass --model (one of another width is refused);
        add_bos / exclude_first_positions stay 0."""
        where = directory / "cfg.json"
        if raw.get("activation", "topk") != "topk" or raw.get("transcode") or raw.get("skip_connection"):
            raise PipelineInputError(
                f"{where}: a sparsify {raw.get('activation')} coder (transcode {raw.get('transcode')}, skip "
                f"{raw.get('skip_connection')}); only plain TopK SAEs import"
            )
        match = re.fullmatch(r"layers\.(\d+)", directory.name)
        if match is None:
            raise PipelineInputError(
                f"{directory}: a sparsify SAE is named by its hookpoint folder (layers.N, a layer's output); "
                f"{directory.name!r} is not one"
            )
        d_in = int(raw["d_in"])
        n_latents = int(raw.get("num_latents") or d_in * int(raw.get("expansion_factor", 32)))
        cfg = SaeConfig(
            d_model=d_in,
            n_latents=n_latents,
            k=int(raw.get("k", 32)),
            normalize="none",
            hook_point=f"resid_post.{match[1]}",
            model={"d_model": d_in, "source": "sparsify"},  # a model of another width is refused, not run
        )
        names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_pre": "b_dec"}
        weights = read_weights(directory / "sae.safetensors", names, "sparsify's")
        return TopKSae.from_weights(cfg, weights, directory / "sae.safetensors", device)

    @staticmethod
    def load_saelens(directory: Path, raw: dict, device: str | torch.device = "cpu") -> "TopKSae":
        """(From load, with `raw` its parsed cfg.json.) A TopK, JumpReLU or standard (ReLU) SAE in SAELens'
        layout (SAE.save_model: cfg.json with
        `metadata`, sae_weights.safetensors with W_enc [d, L], b_enc, W_dec [L, d], b_dec, JumpReLU's
        threshold [L]), for inference: the same forward on raw activations. Gemma Scope and Llama Scope SAEs
        arrive this way: SAE.from_pretrained(release, id) converts them (and folds Llama Scope's input
        norm), save_model writes this layout. What it must be fed comes from the metadata: hook_name
        (blocks.L.hook_resid_pre / _mid / _post), prepend_bos, context_size, seqpos_slice [start, None]."""
        where = directory / "cfg.json"
        meta = raw.get("metadata") or raw  # SAELens < 6 kept these keys at the top level
        arch = raw.get("architecture") or ("topk" if raw.get("activation_fn") == "topk" else "standard")
        if arch not in ("topk", "jumprelu", "standard"):
            raise PipelineInputError(f"{where}: a SAELens {arch!r} SAE; only topk, jumprelu and standard SAEs import")
        if raw.get("activation_fn", "relu") not in ("relu", "topk"):
            raise PipelineInputError(
                f"{where}: activation_fn {raw.get('activation_fn')!r}; only relu (or topk) imports"
            )
        if raw.get("normalize_activations", "none") != "none" or raw.get("reshape_activations", "none") != "none":
            raise PipelineInputError(
                f"{where}: normalize_activations {raw.get('normalize_activations')!r} / reshape_activations "
                f"{raw.get('reshape_activations')!r}; only SAEs on raw activations import"
            )
        hook = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post)", str(meta.get("hook_name")))
        if hook is None:
            raise PipelineInputError(f"{where}: hook_name {meta.get('hook_name')!r} is not a residual-stream hook")
        add_bos = bool(meta.get("prepend_bos", True))
        start = (meta.get("seqpos_slice") or [None])[0] or 0
        context = meta.get("context_size")
        cfg = SaeConfig(
            d_model=int(raw["d_in"]),
            n_latents=int(raw["d_sae"]),
            k=int(raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k", 0)) if arch == "topk" else 0,
            activation="topk" if arch == "topk" else "jumprelu",  # standard: ReLU = JumpReLU at threshold 0
            normalize="none",
            hook_point=f"{hook[2]}.{hook[1]}",
            model={"d_model": int(raw["d_in"]), "source": "saelens", "name": meta.get("model_name")},
            add_bos=add_bos,
            exclude_first_positions=max(0, int(start) - int(add_bos)),
            max_tokens=int(context) - int(add_bos) if context else DEFAULT_MAX_TOKENS,
        )
        path = directory / "sae_weights.safetensors"
        names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch == "jumprelu" else ())
        w = read_weights(path, {k: k for k in names}, "SAELens'")
        w_enc, b_enc, w_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
        if raw.get("rescale_acts_by_decoder_norm") and not torch.allclose(w_dec.norm(dim=1), torch.ones(1), atol=1e-4):
            raise PipelineInputError(
                f"{where}: rescale_acts_by_decoder_norm with non-unit decoder rows does not import"
            )
        if not raw.get("apply_b_dec_to_input", True):
            b_enc = b_enc + b_dec @ w_enc  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        weights = {"W_enc": w_enc.t(), "b_enc": b_enc, "W_dec": w_dec, "b_pre": b_dec}
        if cfg.activation == "jumprelu":
            weights["threshold"] = w["threshold"] if arch == "jumprelu" else torch.zeros(cfg.n_latents)
        return TopKSae.from_weights(cfg, weights, path, device)

    @staticmethod
    def from_weights(cfg: SaeConfig, weights: dict[str, torch.Tensor], path: Path, device) -> "TopKSae":
        """An imported SAE from its tensors in our names; shapes that do not fit cfg are one line naming `path`."""
        sae = TopKSae(cfg)
        try:
            sae.load_state_dict(weights, strict=False)
        except RuntimeError as e:
            raise PipelineInputError(f"{path}: weight shapes do not match its cfg.json ({e})") from None
        return sae.to(device)

    def model_path(self, override: str | None, flag: str = "--sae") -> str:
        """The checkpoint to run this SAE with: `override` (--model) or the path in cfg.json."""
        path = override or (self.cfg.model or {}).get("path")
        if path == "synthetic":
            raise PipelineInputError(f"{flag}: this SAE was trained on synthetic data; there is no model to run")
        return path

    def model_mismatch(self, identity: dict) -> str | None:
        """The first identity key (config, tokenizer, width) where `identity` is not the SAE's model; None: same."""
        trained = self.cfg.model or {}
        for key in ("config_sha256", "tokenizer_sha256", "d_model"):
            if key in trained and key in identity and trained[key] != identity[key]:
                return key
        return None

    def check_model(self, identity: dict, where: str) -> None:
        """Refuse a model other than the one the SAE was trained on (config, tokenizer or width differ)."""
        key = self.model_mismatch(identity)
        if key:
            trained = self.cfg.model
            raise PipelineInputError(
                f"{where}: trained on {trained.get('path')} ({key} {str(trained[key])[:12]}), "
                f"not on --model {identity['path']} ({str(identity[key])[:12]})"
            )

    def export_scale(self, tool: str) -> float:
        """The input scale s an export folds into the weights (1 without normalisation); the other tools have
        no per-token standardisation, so such an SAE is refused."""
        if self.cfg.normalize == "token":
            raise PipelineInputError(f"{tool} has no per-token standardisation; export needs normalize=dataset or none")
        return self.cfg.input_scale if self.cfg.normalize == "dataset" else 1.0

    def export_saelens(self, directory: str | Path, unit_decoder: bool = False) -> None:
        """SAELens 6.x's layout (SAE.load_from_disk): W_enc [d, L], W_dec [L, d], b_enc, b_dec; a TopK SAE
        (a JumpReLU one with its threshold).

        SAELens' encoder has no separate b_pre: its b_dec is subtracted from the input, as ours is. The
        input scale s is folded so the exported SAE works on raw activations: by default into the decoder
        (rows of norm 1/s, our latent values exactly); with unit_decoder into the biases instead (unit rows,
        latents ours / s, `rescale_acts_by_decoder_norm: true`: what sae-dashboard's W_dec-norm folding
        accepts). The metadata carries what the SAE must be fed: the TransformerLens hook of its hook kind,
        context_size and prepend_bos of the capture, and `seqpos_slice` [first trained position, None]
        (BOS and the excluded sink positions left out, as our splice leaves them).
        """
        s = self.export_scale("SAELens")
        norms = self.W_dec.detach().norm(dim=1)
        if unit_decoder and not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise PipelineInputError(
                f"--unit-decoder: this SAE's decoder rows are not unit norm (range {float(norms.min()):.4g}.."
                f"{float(norms.max()):.4g}; an imported SAE?); export it without --unit-decoder"
            )
        if unit_decoder:  # pre' = W_enc (x - b_pre / s) + b_enc / s = pre / s; x̂ = W_dec^T h' + b_pre / s
            w_enc, b_enc, w_dec = self.W_enc.detach(), self.b_enc.detach() / s, self.W_dec.detach()
        else:  # pre = (s W_enc)(x - b_pre / s) + b_enc;  x̂ = (W_dec / s)^T h + b_pre / s
            w_enc, b_enc, w_dec = self.W_enc.detach() * s, self.b_enc.detach(), self.W_dec.detach() / s
        tensors = {"W_enc": w_enc.t(), "W_dec": w_dec, "b_enc": b_enc, "b_dec": self.b_pre.detach() / s}
        if self.cfg.activation == "jumprelu":  # compared with pre-activations, which unit_decoder divides by s
            tensors["threshold"] = self.threshold.detach() / (s if unit_decoder else 1.0)
        hook = HookPoint.parse(self.cfg.hook_point, flag=f"SAE hook point {self.cfg.hook_point!r}")
        if hook.kind not in TRANSFORMERLENS_HOOKS:
            raise PipelineInputError(
                f"SAE at {hook}: TransformerLens has no hook for the RMSNorm output after its weight "
                "(ln*.hook_normalized comes before it); SAELens export needs a resid_pre / resid_mid / resid_post SAE"
            )
        tokenization = self.cfg.tokenization
        model = dict(self.cfg.model or {})
        cfg = {
            "architecture": self.cfg.activation,
            "d_in": self.cfg.d_model,
            "d_sae": self.cfg.n_latents,
            **({"k": self.cfg.k} if self.cfg.activation == "topk" else {}),
            "rescale_acts_by_decoder_norm": unit_decoder,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "dtype": "float32",
            "device": "cpu",
            "metadata": {
                "sae_lens_version": SAELENS_FORMAT_VERSION,
                "sae_lens_training_version": None,  # trained here, not by SAELens
                "hook_name": f"blocks.{hook.layer}.{TRANSFORMERLENS_HOOKS[hook.kind]}",
                # a name, not a local path; the full identity (hashes of config and tokenizer) beside it
                "model_name": Path(model["path"]).stem if model.get("path") else None,
                "model_identity": model,
                "context_size": tokenization.sequence_tokens,
                "prepend_bos": tokenization.add_bos,
                "seqpos_slice": [tokenization.skip_first_positions, None],
                "exported_by": "llama-sae sae.py",
            },
        }
        write_sae_folder(directory, "sae_weights.safetensors", tensors, cfg)

    def export_sparsify(self, directory: str | Path) -> None:
        """sparsify's own layout, loadable by SparseCoder.load_from_disk: encoder.weight [L, d], encoder.bias,
        W_dec [L, d], b_dec [d] + cfg.json (d_in, num_latents, k, ...), on raw activations.

        The dataset scale s is folded so that the decoder rows stay unit norm (sparsify's normalize_decoder):
        pre' = W_enc (x - b_pre / s) + b_enc / s = pre / s, so the same latents fire with activations
        ours / s, and x̂ = W_dec^T h' + b_pre / s is our reconstruction. Steering strengths scale by 1 / s.
        """
        s = self.export_scale("sparsify")
        if self.cfg.activation != "topk":
            raise PipelineInputError(f"sparsify's coders are TopK; a {self.cfg.activation} SAE does not export to it")
        tensors = {
            "encoder.weight": self.W_enc,
            "encoder.bias": self.b_enc / s,
            "W_dec": self.W_dec,
            "b_dec": self.b_pre / s,
        }
        cfg = {
            "activation": "topk",
            "expansion_factor": max(1, self.cfg.n_latents // self.cfg.d_model),
            "normalize_decoder": True,
            "num_latents": self.cfg.n_latents,
            "k": self.cfg.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": self.cfg.d_model,
        }
        write_sae_folder(directory, "sae.safetensors", tensors, cfg)


ExportFormat = Literal["saelens", "sparsify"]


def sparsify_hookpoint(hook_point: str) -> str:
    """sparsify's name for where an SAE reads: "layers.N" is decoder layer N's output, our resid_post.N and
    resid_pre.N+1 (the same tensor)."""
    hp = HookPoint.parse(hook_point, flag=f"SAE hook point {hook_point!r}")
    if hp.kind == "resid_post":
        return f"layers.{hp.layer}"
    if hp.kind == "resid_pre" and hp.layer > 0:
        return f"layers.{hp.layer - 1}"
    raise PipelineInputError(
        f"SAE at {hook_point}: sparsify names a layer's output (layers.N); "
        "export needs resid_post.N or resid_pre.N (N >= 1)"
    )


@dataclass
class ExportConfig:
    sae: str = field(default="runs/sae/sae", metadata={"help": "SAE folder (ours, or sparsify's layout)"})
    format: ExportFormat = field(default="saelens", metadata={"help": "saelens or sparsify"})
    out: str = field(default="", metadata={"help": "output folder (new or empty)"})
    unit_decoder: bool = field(
        default=False,
        metadata={"help": "saelens: unit decoder rows, rescale_acts_by_decoder_norm (for sae-dashboard)"},
    )

    def __post_init__(self) -> None:
        from pipeline.core.cli import check_choices

        check_choices(self)


def export_main(cfg: ExportConfig) -> Path:
    """Write `cfg.sae` in another tool's format to `cfg.out` (refused if it holds files already; sparsify:
    to cfg.out/layers.N). Returns the folder written."""
    out = Path(cfg.out)
    if not cfg.out:
        raise PipelineInputError("--out: the export's folder is required")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineInputError(f"--out {out}: exists and is not an empty folder")
    sae = TopKSae.load(cfg.sae)
    if cfg.format == "saelens":
        sae.export_saelens(out, unit_decoder=cfg.unit_decoder)
    else:  # sparsify loads one folder per hookpoint, named by it
        out = out / sparsify_hookpoint(sae.cfg.hook_point)
        sae.export_sparsify(out)
    sparsity = f"k {sae.cfg.k}" if sae.cfg.activation == "topk" else sae.cfg.activation
    print(f"{out}: {cfg.sae} as {cfg.format} ({sae.cfg.n_latents} latents, {sparsity}, {sae.cfg.hook_point})")
    return out


if __name__ == "__main__":
    import sys

    from pipeline.core.cli import parse_config, run_main

    if sys.argv[1:2] != ["export"]:
        sys.exit("usage: python sae.py export --format saelens|sparsify [--sae DIR] --out DIR")
    run_main(export_main, parse_config(ExportConfig, sys.argv[2:], description=__doc__))
