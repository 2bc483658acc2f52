"""ModelArgs: the architecture of a Llama 3 model, read from the file that ships with it.

Three sources describe the same architecture in different words:
- Meta's `params.json` (dim, n_layers, ffn_dim_multiplier/multiple_of, use_scaled_rope),
- Hugging Face's `config.json` (hidden_size, intermediate_size, rope_scaling),
- GGUF metadata (llama.embedding_length, ..., plus a `rope_freqs` tensor for Llama-3 scaling).

Each reader maps its keys onto one `ModelArgs`, refuses contradictions with a
`PipelineInputError`, and logs every decision it takes on the user's behalf.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llama_3.errors import PipelineInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (Meta's `apply_scaling`, HF's rope_type "llama3")."""

    factor: float
    """Divisor of the low frequencies: 8 for Llama 3.1, 32 for Llama 3.2 1B/3B."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by `factor`."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """The context length the model was pre-trained with before the long-context extension."""


@dataclass
class ModelArgs:
    """Architecture of a Llama-3-family decoder. Field names follow Meta's reference."""

    dim: int
    """d_model: width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Number of query heads."""
    n_kv_heads: int
    """Number of key/value heads (grouped-query attention when < n_heads)."""
    vocab_size: int
    """Rows of the token embedding (and of the output projection)."""
    hidden_dim: int
    """Inner width of the SwiGLU feed-forward (HF: intermediate_size)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 500000.0
    """RoPE base frequency."""
    rope_scaling: RopeScaling | None = None
    """Llama-3 RoPE scaling; None for unscaled RoPE (Llama 3.0, SmolLM2)."""
    rope_freq_factors: list[float] | None = None
    """Explicit per-frequency divisors (GGUF's `rope_freqs` tensor); exclusive with rope_scaling."""
    max_seq_len: int = 8192
    """Longest sequence (prompt + generation) the model accepts."""
    tie_word_embeddings: bool = False
    """The output projection reuses the token embedding (Llama 3.2 1B/3B, SmolLM2)."""
    decisions: list[str] = field(default_factory=list, compare=False, repr=False)
    """Human-readable record of choices made while reading the config (also logged)."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise PipelineInputError(f"model args: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise PipelineInputError(f"model args: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise PipelineInputError(
                f"model args: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise PipelineInputError(f"model args: head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None and self.rope_freq_factors is not None:
            raise PipelineInputError("model args: rope_scaling and rope_freq_factors are exclusive")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise PipelineInputError(
                f"model args: rope_freq_factors has {len(self.rope_freq_factors)} entries, expected "
                f"head_dim/2={self.head_dim // 2}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("decisions")
        return d

    def decide(self, message: str) -> None:
        """Record and log a choice the reader made that the file did not spell out."""
        self.decisions.append(message)
        log.warning(message)


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineInputError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise PipelineInputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise PipelineInputError(f"{path}: expected a JSON object")
    return data


def _require(d: dict[str, Any], key: str, source: str, kind: type = int) -> Any:
    if key not in d:
        raise PipelineInputError(f"{source}: missing required field '{key}'")
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PipelineInputError(f"{source}: field '{key}' must be {kind.__name__}, got {value!r}")
    return value


# Llama 3.2's text models are the only released Meta checkpoints with use_scaled_rope and
# factor 32; their params.json does not carry the factor (Meta's code took it from the model
# family). We recognise them by shape: (dim, n_layers) of 3.2-1B and 3.2-3B.
_LLAMA_32_SHAPES = {(2048, 16), (3072, 28)}

# params.json keys that do not change the architecture.
_META_BENIGN_KEYS = {"max_batch_size"}
_META_KEYS = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "rope_scaling_factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "rope_scaling",
    "max_seq_len",
}


def _rope_scaling_from_dict(d: dict[str, Any], source: str) -> RopeScaling:
    if "factor" not in d:
        raise PipelineInputError(f"{source}: rope_scaling has no 'factor'")
    try:
        return RopeScaling(
            factor=float(d["factor"]),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )
    except (TypeError, ValueError) as e:
        raise PipelineInputError(f"{source}: bad rope_scaling {d!r} ({e})") from None


def args_from_meta_params(path: str | Path) -> ModelArgs:
    """Read Meta's `params.json`.

    The Llama-3 RoPE factor is taken, in order, from: `rope_scaling` / `rope_scaling_factor` in
    params.json; a Hugging Face `config.json` beside it or one folder up (the HF repos ship Meta's
    files under `original/`); else, for `use_scaled_rope: true`, from the model shape (Llama 3.2
    1B/3B -> 32, anything else -> 8, Llama 3.1's value), logged as a decision.
    """
    path = Path(path)
    source = str(path)
    p = _read_json(path)
    unknown = set(p) - _META_KEYS - _META_BENIGN_KEYS
    if unknown:
        raise PipelineInputError(f"{source}: unknown field(s) {sorted(unknown)} (not a Llama 3 text model?)")
    dim = _require(p, "dim", source)
    n_layers = _require(p, "n_layers", source)
    n_heads = _require(p, "n_heads", source)
    n_kv_heads = p.get("n_kv_heads") or n_heads
    vocab_size = _require(p, "vocab_size", source)
    multiple_of = int(p.get("multiple_of", 256))
    hidden_dim = meta_ffn_hidden_dim(dim, multiple_of, p.get("ffn_dim_multiplier"))

    decisions: list[str] = []
    use_scaled = p.get("use_scaled_rope")
    explicit = None
    if isinstance(p.get("rope_scaling"), dict):
        explicit = _rope_scaling_from_dict(p["rope_scaling"], source)
    elif "rope_scaling_factor" in p:
        explicit = _rope_scaling_from_dict(
            {
                "factor": p["rope_scaling_factor"],
                **{
                    k: p[k]
                    for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                    if k in p
                },
            },
            source,
        )
    if explicit is not None and use_scaled is False:
        raise PipelineInputError(f"{source}: use_scaled_rope is false but a RoPE scaling factor is given")
    rope_scaling = explicit
    if rope_scaling is None and use_scaled:
        for hf_config in (path.parent / "config.json", path.parent.parent / "config.json"):
            if hf_config.is_file():
                rs = _read_json(hf_config).get("rope_scaling")
                if isinstance(rs, dict) and "factor" in rs:
                    rope_scaling = _rope_scaling_from_dict(rs, str(hf_config))
                    decisions.append(f"{source}: RoPE scaling factor {rope_scaling.factor:g} taken from {hf_config}")
                    break
        if rope_scaling is None:
            factor = 32.0 if (dim, n_layers) in _LLAMA_32_SHAPES else 8.0
            family = "Llama 3.2" if factor == 32.0 else "Llama 3.1"
            rope_scaling = RopeScaling(factor=factor)
            decisions.append(
                f"{source}: use_scaled_rope without a factor; dim={dim}, n_layers={n_layers} is {family}'s "
                f'shape, so factor={factor:g} (add "rope_scaling_factor" to params.json to override)'
            )
    if "max_seq_len" in p:
        max_seq_len = int(p["max_seq_len"])
    else:
        max_seq_len = 131072 if use_scaled else 8192
        decisions.append(
            f"{source}: no max_seq_len; using {max_seq_len} ({'scaled' if use_scaled else 'unscaled'} RoPE)"
        )
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        hidden_dim=hidden_dim,
        norm_eps=float(p.get("norm_eps", 1e-5)),
        rope_theta=float(p.get("rope_theta", 500000.0)),
        rope_scaling=rope_scaling,
        max_seq_len=max_seq_len,
        tie_word_embeddings=False,
    )
    for d in decisions:
        args.decide(d)
    return args


# config.json keys that are metadata, generation defaults or values we check elsewhere.
_HF_BENIGN_KEYS = {
    "architectures",
    "model_type",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "_name_or_path",
    "_attn_implementation_autoset",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "pretraining_tp",
    "head_dim",
    "tie_word_embeddings",
    "rope_scaling",
    "rope_theta",
    "rope_parameters",
    "max_position_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "is_llama_config",
    "rope_interleaved",
    "quantization_config",
    "_commit_hash",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "chunk_size_feed_forward",
    "problem_type",
    "tokenizer_class",
}


def args_from_hf_config(path: str | Path) -> ModelArgs:
    """Read a Hugging Face `config.json` of a LlamaForCausalLM."""
    path = Path(path)
    source = str(path)
    c = _read_json(path)
    if c.get("model_type", "llama") != "llama":
        raise PipelineInputError(f"{source}: model_type is {c['model_type']!r}, expected 'llama'")
    if c.get("hidden_act", "silu") != "silu":
        raise PipelineInputError(f"{source}: hidden_act {c['hidden_act']!r} is not supported (Llama uses 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise PipelineInputError(f"{source}: {flag}=true is not supported by Llama 3")
    if c.get("pretraining_tp", 1) != 1:
        log.warning("%s: pretraining_tp=%s only affects HF's slicing of matmuls; ignored", source, c["pretraining_tp"])
    dim = _require(c, "hidden_size", source)
    n_heads = _require(c, "num_attention_heads", source)
    if c.get("head_dim") not in (None, dim // n_heads):
        raise PipelineInputError(
            f"{source}: head_dim={c['head_dim']} differs from hidden_size/num_attention_heads={dim // n_heads}"
        )

    # transformers >= 4.56 may nest rope_theta and the scaling under "rope_parameters".
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise PipelineInputError(f"{source}: rope_scaling must be an object or null")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_theta = float(c.get("rope_theta", rope.get("rope_theta", 10000.0)))
    if rope_type == "llama3":
        rope_scaling = _rope_scaling_from_dict(rope, source)
    elif rope_type in ("default", None):
        if "factor" in rope:
            raise PipelineInputError(f"{source}: rope scaling has a factor but rope_type is {rope_type!r}")
        rope_scaling = None
    else:
        raise PipelineInputError(f"{source}: rope_type {rope_type!r} is not supported (only 'llama3' or none)")

    args = ModelArgs(
        dim=dim,
        n_layers=_require(c, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        vocab_size=_require(c, "vocab_size", source),
        hidden_dim=_require(c, "intermediate_size", source),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=int(c.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
    unknown = sorted(set(c) - _HF_BENIGN_KEYS)
    if unknown:
        args.decide(f"{source}: ignoring field(s) that do not change a Llama forward: {unknown}")
    return args


def args_from_gguf_metadata(meta: dict[str, Any], source: str, rope_freq_factors: list[float] | None) -> ModelArgs:
    """Read GGUF `llama.*` metadata (already decoded to Python values)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise PipelineInputError(f"{source}: general.architecture is {arch!r}, expected 'llama'")

    def g(key: str, default: Any = None) -> Any:
        full = f"llama.{key}"
        if full not in meta:
            if default is None:
                raise PipelineInputError(f"{source}: missing GGUF metadata '{full}'")
            return default
        return meta[full]

    dim = int(g("embedding_length"))
    n_heads = int(g("attention.head_count"))
    rope_dims = meta.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != dim // n_heads:
        raise PipelineInputError(f"{source}: partial RoPE (rope.dimension_count={rope_dims}) is not supported")
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise PipelineInputError(f"{source}: llama.rope.scaling.type={scaling_type!r} is not supported")
    n_vocab = meta.get("llama.vocab_size")
    if n_vocab is None:
        n_vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else None
    if n_vocab is None:
        raise PipelineInputError(f"{source}: no llama.vocab_size and no tokenizer.ggml.tokens")
    return ModelArgs(
        dim=dim,
        n_layers=int(g("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        vocab_size=int(n_vocab),
        hidden_dim=int(g("feed_forward_length")),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_freq_factors=rope_freq_factors,
        max_seq_len=int(g("context_length", 8192)),
        tie_word_embeddings=False,
    )


def rope_base_frequencies(args: ModelArgs) -> np.ndarray:
    """Per-pair inverse frequencies before any scaling, [head_dim / 2] float32.

    Meta and HF compute them in float32; so do we, so parity holds to the last bit."""
    hd = args.head_dim
    return (1.0 / (np.float32(args.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(
        np.float32
    )


def rope_inverse_frequencies(args: ModelArgs) -> list[float]:
    """Per-pair inverse frequencies after Llama-3 scaling (float64 math, used to build an fp32 buffer).

    Mirrors Meta's `apply_scaling`: high frequencies (short wavelengths) are kept, low ones are
    divided by `factor`, and the band between is interpolated smoothly.
    """
    freqs = rope_base_frequencies(args)
    if args.rope_freq_factors is not None:
        return (freqs / np.asarray(args.rope_freq_factors, dtype=np.float32)).tolist()
    rs = args.rope_scaling
    if rs is None:
        return freqs.tolist()
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_freq_wavelen:
            out.append(f)
        elif wavelen > low_freq_wavelen:
            out.append(f / rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return out


def rope_scaling_from_factors(args: ModelArgs, where: str = "model") -> RopeScaling | None:
    """The Llama-3 scaling whose per-pair divisors are `args.rope_freq_factors` (llama.cpp's GGUF `rope_freqs`,
    which its converter computes from the checkpoint's rope_scaling); None when every divisor is 1.

    Divisor 1 keeps a pair, `factor` (the largest) divides it, and between them 1/divisor interpolates
    linearly in 1/wavelength: smooth = original_max_position_embeddings / wavelength / (high - low) - low / (high
    - low). Two or more interpolated pairs give that line, and with low_freq_factor = 1 (every Llama 3.x
    release) high and the original length follow; with fewer, high_freq_factor 4 is assumed too. A candidate
    counts only if it reproduces every divisor (rtol 1e-5); otherwise the factors are refused with one line."""
    div = np.asarray(args.rope_freq_factors, dtype=np.float64)
    if np.allclose(div, 1.0, rtol=0, atol=1e-6):
        return None
    wavelen = 2 * math.pi / rope_base_frequencies(args).astype(np.float64)
    factor = float(div.max())
    kept, scaled = div <= 1 + 1e-6, div >= factor * (1 - 1e-6)
    mid = ~kept & ~scaled
    smooth = (1 / div[mid] - 1 / factor) / (1 - 1 / factor)
    candidates = []
    if mid.sum() >= 2:
        # smooth = slope / wavelength + intercept: slope = orig / (high - low), intercept = -low / (high - low)
        slope, intercept = np.polyfit(1 / wavelen[mid], smooth, 1)
        if intercept < 0:
            width = -1.0 / intercept
            candidates.append(RopeScaling(factor, 1.0, round(float(1.0 + width), 4), int(round(slope * width))))
    elif mid.sum() == 1:
        candidates.append(RopeScaling(factor, 1.0, 4.0, int(round(float(wavelen[mid][0] * (3 * smooth[0] + 1))))))
    else:  # any length with every kept wavelength below orig / 4 and every scaled one above orig
        lo, hi = 4 * wavelen[kept].max(initial=0.0), wavelen[scaled].min()
        candidates += [RopeScaling(factor, 1.0, 4.0, n) for n in (8192, int(lo) + 1) if lo < n < hi]
    target = np.asarray(rope_inverse_frequencies(args))
    for c in candidates:
        trial = np.asarray(rope_inverse_frequencies(replace(args, rope_scaling=c, rope_freq_factors=None)))
        if np.allclose(trial, target, rtol=1e-5, atol=0):
            return c
    raise PipelineInputError(
        f"{where}: its RoPE frequency divisors (GGUF rope_freqs) are not a Llama-3 scaling "
        "that a transformers config can state; load the Hugging Face or Meta checkpoint instead"
    )
