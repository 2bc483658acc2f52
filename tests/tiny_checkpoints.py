"""Tiny random Llama 3 checkpoints in all three formats, written by the tests themselves.

The reference model is a Hugging Face `LlamaForCausalLM` with random weights (GQA, Llama-3 RoPE
scaling with bands small enough that short sequences exercise all three of them). Its weights are
written as an HF directory by transformers itself, and as a Meta directory and a GGUF file by the
writers below. The tokenizer is a byte-level BPE trained on a paragraph, with Llama 3's pre-tokenizer
and special tokens, exported as tokenizer.json, as a tiktoken ranks file and as GGUF vocab + merges.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch

from llama_3.args import ModelArgs
from llama_3.tokenizer import (
    BYTE_TO_UNICODE,
    GGUF_TOKEN_CONTROL,
    GGUF_TOKEN_NORMAL,
    LLAMA3_NUM_RESERVED_SPECIAL,
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
)

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in the residual stream "
    "of a language model. Paris is the capital of France; Berlin is the capital of Germany. In 1969, 12 men "
    "walked on the Moon! Numbers like 3.14159 and 2718 appear too. Émile said: «ça va?» and left.\n"
) * 4

SAMPLE_TEXT = "The lazy fox said: Paris is in France, 42 times?! Émile's «café» — naïve 日本 text.\n\nNew line."

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    # Large enough weights that attention is peaked and positions (RoPE) visibly matter.
    initializer_range=0.15,
)
# Bands: wavelengths < 8 kept, > 32 divided by factor, in between smoothed (head_dim 16, theta 10000).
TINY_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
TINY_ROPE_THETA = 10000.0


def special_tokens() -> list[str]:
    return LLAMA3_SPECIAL_TOKENS + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_RESERVED_SPECIAL - len(LLAMA3_SPECIAL_TOKENS))
    ]


def train_tiny_bpe(vocab_size: int = 360):
    """A byte-level BPE with Llama 3's pre-tokenizer; returns (tokenizers.Tokenizer with specials, n_base)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    n_base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    bos = n_base
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tok, n_base


def _vocab_and_merges(tok) -> tuple[list[str], list[str]]:
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


def write_hf_tokenizer(tok, directory: Path, chat_template: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_tiktoken_model(tok, path: Path) -> None:
    """tokenizer.model: one `base64(bytes) rank` line per BPE token, rank = id."""
    unicode_to_byte = {c: b for b, c in BYTE_TO_UNICODE.items()}
    tokens, _ = _vocab_and_merges(tok)
    lines = [base64.b64encode(bytes(unicode_to_byte[c] for c in t)).decode() + f" {i}" for i, t in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")


def make_hf_reference(seed: int = 0, vocab_size: int | None = None, tie: bool = False):
    """A random transformers LlamaForCausalLM (fp32, eager-free sdpa) plus the trained tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, _ = train_tiny_bpe()
    cfg = LlamaConfig(
        vocab_size=vocab_size or tok.get_vocab_size(),
        rope_theta=TINY_ROPE_THETA,
        rope_scaling=dict(TINY_ROPE),
        bos_token_id=tok.token_to_id("<|begin_of_text|>"),
        eos_token_id=tok.token_to_id("<|end_of_text|>"),
        **{**TINY_CONFIG, "tie_word_embeddings": tie},
    )
    model = LlamaForCausalLM(cfg).eval()
    # Every weight drawn by numpy, not by torch's init: ATen's normal_ is vectorised per instruction set
    # and draws other numbers on a CPU without AVX2, and the tests' model must be the same on any CPU.
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            draw = rng.standard_normal(tuple(p.shape), dtype=np.float32)
            # Random norm weights, so a swapped or missing norm cannot go unnoticed.
            p.copy_(torch.from_numpy(1 + 0.1 * draw if "norm" in name else cfg.initializer_range * draw))
    return model, tok


def write_meta_checkpoint(directory: Path, state_dict: dict, args: ModelArgs, tok, multiple_of: int = 32) -> None:
    """params.json + consolidated.00.pth + tokenizer.model, as Meta ships them."""
    from llama_3.args import meta_ffn_hidden_dim

    directory.mkdir(parents=True, exist_ok=True)
    assert meta_ffn_hidden_dim(args.dim, multiple_of, None) == args.hidden_dim, "pick dims Meta's FFN rule reproduces"
    rs = args.rope_scaling
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": None,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": rs is not None,
        "max_seq_len": args.max_seq_len,
    }
    if rs is not None:
        params.update(
            rope_scaling_factor=rs.factor,
            low_freq_factor=rs.low_freq_factor,
            high_freq_factor=rs.high_freq_factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
        )
    (directory / "params.json").write_text(json.dumps(params))
    sd = {k: v.clone() for k, v in state_dict.items()}
    if args.tie_word_embeddings:
        sd.pop("output.weight", None)
    torch.save(sd, directory / "consolidated.00.pth")
    write_tiktoken_model(tok, directory / "tokenizer.model")


def llama_cpp_rope_factors(args: ModelArgs) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor for Llama-3 scaling (written independently of our reader)."""
    rs = args.rope_scaling
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    factors = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            factors.append(1.0)
        elif wl > low_wl:
            factors.append(rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            factors.append(1.0 / ((1 - smooth) / rs.factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_gguf_checkpoint(path: Path, state_dict: dict, args: ModelArgs, tok, chat_template: str | None = None) -> None:
    """A GGUF file in llama.cpp's layout (Meta-ordered Q/K rows, GGUF tensor names, F32)."""
    import gguf

    from llama_3.checkpoints import meta_to_gguf_name

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    tokens, merges = _vocab_and_merges(tok)
    specials = special_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens + specials)
    w.add_token_types([GGUF_TOKEN_NORMAL] * len(tokens) + [GGUF_TOKEN_CONTROL] * len(specials))
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens))
    w.add_eos_token_id(len(tokens) + 1)
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)
    for name, t in state_dict.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        w.add_tensor(meta_to_gguf_name(name), t.detach().float().numpy().copy())
    if args.rope_scaling is not None:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(args))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
