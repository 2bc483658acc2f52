"""TopK sparse autoencoder with a fast sparse path and a dense reference path.

    h  = TopK(W_enc (x̃ - b_pre) + b_enc + h_bias)      ReLU on the kept values; h_bias steers (not trained)
    x̂  = W_dec^T h + b_pre                              each latent's decoder row W_dec[i] has unit norm

A transcoder (`output_hook_point` set, e.g. ffn_norm.L -> mlp_out.L) predicts another hook point's activation
ŷ from x: h = TopK(W_enc x̃ + b_enc), ŷ̃ = W_dec^T h + b_pre (+ W_skip x̃ with `skip`, Gemma Scope 2's
skip-transcoder), with b_pre the output's bias (no input centering, as SAELens' transcoders) and ŷ = ŷ̃ /
output_scale. Llama Scope's variant `topk_by_decoder_norm` leaves decoder norms free and picks the k latents
by pre-activation x ||W_dec[i]|| (their contribution to x̂), keeping the pre-activations as the values.

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
hook point, model identity and the data it was trained on). Other tools' layouts are read and written in
pipeline/sae/formats.py (`TopKSae.load` reads any of them).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from llama_3.cpu_features import can_prepack
from llama_3.errors import PipelineInputError
from pipeline.core.manifest import atomic_path
from pipeline.core.tokenization import DEFAULT_MAX_TOKENS, Tokenization

Normalize = Literal["dataset", "token", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalize)
Activation = Literal["topk", "jumprelu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
ENCODER_INIT_NORM = 3**-0.5
SAE_WEIGHTS, SAE_CONFIG = "sae.safetensors", "cfg.json"
"""An SAE folder: its weights and its SaeConfig (sparsify's folders use the same two names)."""
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class TrainingData:
    """Where an SAE's training activations came from, recorded when it is trained, so later stages read it
    here instead of walking the run's manifests (empty for an imported SAE)."""

    preprocessed: str = ""
    """The preprocessing output it trained on."""
    preprocessed_fingerprint: str = ""
    capture: str = ""
    """The capture that preprocessing read ("" when unknown)."""
    capture_fingerprint: str = ""
    capture_sentences: int = 0
    """Sentences the capture took from the dataset, the first N (0: every sentence)."""
    sentences: str = ""
    """The sentence dataset the capture read."""
    sentences_fingerprint: str = ""


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
    sink_norm: float = 0.0
    """Input tokens with a larger norm (massive activations, left out of the training data) are passed through:
    x̂ = x and no latent active. 0: none."""
    output_hook_point: str = ""
    """A transcoder's target (e.g. mlp_out.L for a hook_point ffn_norm.L); "" for an SAE, which reconstructs
    its input."""
    output_scale: float = 1.0
    """A transcoder's target scale: ŷ̃ = y * output_scale has E||ŷ̃||² = d_model on the training data."""
    skip: bool = False
    """A transcoder with a linear skip connection W_skip [d, d] from the input (zero at the start)."""
    topk_by_decoder_norm: bool = False
    """Llama Scope: choose the TopK by pre-activation x decoder row norm; decoder norms are not constrained."""
    activation: Activation = "topk"
    """topk: the k largest pre-activations, ReLU'd (what sae_training trains). jumprelu: every latent whose
    pre-activation exceeds its own `threshold` (and 0) keeps it: Gemma Scope / Llama Scope SAEs, and plain
    ReLU SAEs with threshold 0; inference only (imported, never trained here)."""
    trained_on: TrainingData = field(default_factory=TrainingData)
    """The preprocessed data, capture and sentences it was trained from (paths and fingerprints)."""

    @property
    def tokenization(self) -> Tokenization:
        """How a sentence becomes the token sequence this SAE was trained on."""
        return Tokenization(self.add_bos, self.max_tokens, self.exclude_first_positions, self.sink_norm)

    def __post_init__(self) -> None:
        if isinstance(self.trained_on, dict):  # read back from cfg.json
            self.trained_on = TrainingData(**self.trained_on)
        if self.activation not in ACTIVATIONS:
            raise PipelineInputError(f"SAE config: activation={self.activation!r}, expected one of {ACTIVATIONS}")
        if self.activation == "topk" and not 0 < self.k <= self.n_latents:
            raise PipelineInputError(f"SAE config: k={self.k} must be in 1..n_latents={self.n_latents}")
        if self.activation == "jumprelu" and self.k != 0:
            raise PipelineInputError(f"SAE config: k={self.k} with jumprelu (its count varies per token; k must be 0)")
        if self.normalize not in NORMALIZATIONS:
            raise PipelineInputError(f"SAE config: normalize={self.normalize!r}, expected one of {NORMALIZATIONS}")
        if self.output_hook_point and self.normalize == "token":
            raise PipelineInputError(
                "SAE config: a transcoder normalises by its data's scale (normalize=dataset or none)"
            )
        if self.skip and not self.output_hook_point:
            raise PipelineInputError("SAE config: skip=True needs a transcoder (output_hook_point)")
        if self.sink_norm and self.output_hook_point:
            raise PipelineInputError("SAE config: sink_norm with a transcoder (it has no input to pass through)")

    @property
    def is_transcoder(self) -> bool:
        return bool(self.output_hook_point)

    @property
    def site_hook_point(self) -> str:
        """Where the SAE's output goes in the model: the hook point it reconstructs or a transcoder's target."""
        return self.output_hook_point or self.hook_point


@dataclass
class SaeOutput:
    x_hat: torch.Tensor  # [N, d] reconstruction in the input's (raw) space (a transcoder's: its target's)
    values: torch.Tensor  # [N, k] post-ReLU activations of the active latents (JumpReLU: [N, w], see encode)
    indices: torch.Tensor  # [N, k] their latent ids, distinct within a row
    x_norm: torch.Tensor  # [N, d] the normalised input the SAE saw
    x_hat_norm: torch.Tensor  # [N, d] the reconstruction in normalised space (a transcoder's: the target's)


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
    """Top-k of W_enc (x - b_pre) + b whose backward only uses the k kept entries per token.

    forward: x [N, d], W [L, d], b [L], b_pre [d] or None -> values [N, k] (ReLU'd), indices [N, k]
    backward: grad_values [N, k] -> a sparse [N, L] gradient G with N*k entries;
              dW = Gᵀ @ (x - b_pre) (a CSR matmul: N*k*d work), db = column sums of G,
              db_pre = -db @ W (one [L] x [L, d] product: b_pre is subtracted from every row, so the per-row
              dx = G @ W is never formed unless x itself needs a gradient).
    """

    @staticmethod
    def forward(ctx, x, W, b, h_bias, k, score_scale, b_pre):
        xc = x if b_pre is None else x - b_pre
        pre = encoder_preacts(xc, W, b + h_bias)  # [N, L]
        top, idx = topk_of(pre, k, score_scale)
        values = top.relu()
        ctx.save_for_backward(xc, W, idx, values)
        return values, idx

    @staticmethod
    def backward(ctx, grad_values, _grad_idx):
        xc, W, idx, values = ctx.saved_tensors
        n_latents = W.shape[0]
        g = (grad_values * (values > 0)).to(xc.dtype)  # ReLU; fp32 even when autocast made the values bf16
        grad_x = _token_major(idx, g, n_latents)[0] @ W if ctx.needs_input_grad[0] else None
        grad_W = _latent_major(idx, g, n_latents) @ xc if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(n_latents, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        grad_b_pre = -(grad_b @ W) if ctx.needs_input_grad[6] else None
        return grad_x, grad_W, grad_b if ctx.needs_input_grad[2] else None, None, None, None, grad_b_pre


def topk_of(pre: torch.Tensor, k: int, score_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest pre-activations of each row [N, L] -> (values [N, k], indices [N, k]); with score_scale [L]
    (the decoder row norms) ranked by pre x scale, the values still the plain pre-activations."""
    if score_scale is None:
        return pre.topk(k, dim=-1, sorted=False)
    idx = (pre * score_scale.to(pre.dtype)).topk(k, dim=-1, sorted=False).indices
    return pre.gather(1, idx), idx


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
    with atomic_path(directory / SAE_CONFIG) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2))


class TopKSae(nn.Module):
    def __init__(self, cfg: SaeConfig):
        super().__init__()
        self.cfg = cfg
        self.directory: Path | None = None  # where load_sae read it from (None: made in code)
        self.sha256: str | None = None  # its weights file's sha256, set by load_sae (None: made in code)
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
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d, d))  # [d_out, d_in]
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

    def normalize_target(self, y: torch.Tensor) -> torch.Tensor:
        """What the reconstruction is compared with, in normalised space: a transcoder's target y [N, d] scaled
        by output_scale; an SAE's target is its own normalised input (see normalize_input)."""
        if not self.cfg.is_transcoder:
            return self.normalize_input(y)[0]
        return y * self.cfg.output_scale if self.cfg.normalize == "dataset" else y

    def denormalize(self, x_norm: torch.Tensor, ctx: tuple) -> torch.Tensor:
        if self.cfg.is_transcoder:
            return x_norm / self.cfg.output_scale if self.cfg.normalize == "dataset" else x_norm
        if self.cfg.normalize == "dataset":
            return x_norm / self.cfg.input_scale
        if self.cfg.normalize == "token":
            mu, sd = ctx
            return x_norm * sd + mu
        return x_norm

    # ---- encode / decode ------------------------------------------------------------------
    def score_scale(self) -> torch.Tensor | None:
        """[L] the decoder row norms the TopK ranks by (topk_by_decoder_norm), else None."""
        return self.W_dec.detach().norm(dim=1) if self.cfg.topk_by_decoder_norm else None

    def encoder_input(self, x_norm: torch.Tensor) -> torch.Tensor:
        """What W_enc multiplies: x̃ - b_pre for an SAE, x̃ for a transcoder (its b_pre is the output's bias)."""
        return x_norm if self.cfg.is_transcoder else x_norm - self.b_pre

    def activate(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations [N, L] -> the code (values [N, w], indices [N, w]), indices distinct within a row.

        TopK: w = k. JumpReLU: w = the most latents active on any token of this batch (at least 1), so
        one batch is one dense-width code without truncation; a row with fewer active latents is padded
        with value-0 entries of inactive latents, which decode, aggregate and rank as nothing."""
        if self.cfg.activation == "topk":
            top, idx = topk_of(pre, k or self.cfg.k, self.score_scale())
            return top.relu(), idx
        active = (pre > self.threshold) & (pre > 0)  # SAELens: ReLU(pre) * (pre > threshold)
        width = max(1, int(active.sum(1).max())) if len(pre) else 1
        return pre.where(active, 0.0).topk(min(width, pre.shape[1]), dim=-1, sorted=False)

    def encode(
        self, x_norm: torch.Tensor, dense: bool = False, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x̃ [N, d] -> (values [N, k], indices [N, k]) (JumpReLU: [N, w], see activate); `k` overrides cfg.k
        (K-annealing in training)."""
        if dense:
            return self.activate(self.encoder_input(x_norm) @ self.W_enc.t() + self.b_enc + self.h_bias, k)
        if self.cfg.activation != "topk":  # inference only: no sparse backward needed
            return self.activate(encoder_preacts(self.encoder_input(x_norm), self.W_enc, self.b_enc + self.h_bias))
        b_pre = None if self.cfg.is_transcoder else self.b_pre  # what encoder_input subtracts
        return _SparseEncoderGrad.apply(
            x_norm, self.W_enc, self.b_enc, self.h_bias, k or self.cfg.k, self.score_scale(), b_pre
        )

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

    def forward(self, x: torch.Tensor, dense: bool = False, k: int | None = None) -> SaeOutput:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_norm, ctx = self.normalize_input(x2)
        values, indices = self.encode(x_norm, dense, k)
        x_hat_norm = self.decode(values, indices, dense)
        if self.cfg.skip:  # [N, d_in] @ [d_in, d_out]: a dense d x d matmul, small beside the encoder's d x L
            x_hat_norm = x_hat_norm + x_norm @ self.W_skip.t()
        x_hat = self.denormalize(x_hat_norm, ctx)
        sink = self.sinks(x2)
        # passed through: nothing to reconstruct, no loss, no latent fires. The training data holds none
        # (preprocessing left them out): on a CPU, no copies then
        if sink is not None and (sink.device.type != "cpu" or bool(sink.any())):
            values = values.masked_fill(sink[:, None], 0.0)
            x_hat_norm = torch.where(sink[:, None], x_norm, x_hat_norm)
            x_hat = torch.where(sink[:, None], x2, x_hat)
        return SaeOutput(x_hat.reshape(shape), values, indices, x_norm, x_hat_norm)

    def sinks(self, x: torch.Tensor) -> torch.Tensor | None:
        """[N, d] raw inputs -> [N] bool, the massive-activation tokens (norm > cfg.sink_norm); None without."""
        return x.float().norm(dim=-1) > self.cfg.sink_norm if self.cfg.sink_norm else None

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> x̂ [..., d] in raw space (a transcoder's: ŷ at its output hook): the callable a splice
        uses."""
        return self(x).x_hat

    # ---- decoder constraints --------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Each latent's decoder row back to unit norm (after every optimizer step; not with free norms)."""
        if self.cfg.topk_by_decoder_norm:
            return
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each row's gradient its component along that row (before the optimizer step).

        g_i <- g_i - (g_i . w_i) / (w_i . w_i) w_i: moving along w_i would only change its norm,
        which normalize_decoder undoes anyway (dividing by w_i . w_i keeps it exact when the
        rows are only unit-norm up to rounding).
        """
        g = self.W_dec.grad
        if g is not None and not self.cfg.topk_by_decoder_norm:
            w = self.W_dec
            g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w

    # ---- files ---------------------------------------------------------------------------
    @staticmethod
    def load(directory: str | Path, device: str | torch.device = "cpu") -> "TopKSae":
        """The SAE in `directory`: ours, SAELens' or sparsify's layout (pipeline/sae/formats.py: `load_sae`)."""
        # formats.py builds TopKSae objects, so it imports this module; imported at call time to avoid the cycle.
        from pipeline.sae.formats import load_sae

        return load_sae(directory, device)

    def save(self, directory: str | Path) -> None:
        write_sae_folder(directory, SAE_WEIGHTS, self.state_dict(), asdict(self.cfg))

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
