"""Our loaded model as a plain transformers LlamaForCausalLM (no quantization_config: a GGUF checkpoint comes
out dequantized), for TransformerLens, SAELens and anything else that wants a Hugging Face model.

    from llama_3 import load_model
    from llama_3.transformers_export import to_transformers
    hf = to_transformers(load_model(None))        # the embedded SmolLM2, from its GGUF
    save_pretrained(hf, "smollm2-hf")              # readable by transformers 4.x too (TransformerLens 2, sae-dashboard)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from llama_3.args import rope_scaling_from_factors
from llama_3.checkpoints import meta_to_hf_state_dict
from llama_3.errors import PipelineInputError
from llama_3.tokenizer import HFBackend


def to_transformers(lm, attn: str = "sdpa"):
    """LlamaForCausalLM with our weights (Meta -> HF names, q/k rows permuted), in the model's dtype and device."""
    # transformers is a test / export extra, not a dependency: imported only when an export is asked for
    from transformers import LlamaConfig, LlamaForCausalLM

    a = lm.args
    scaling = a.rope_scaling
    if a.rope_freq_factors is not None:  # a GGUF states the scaling as divisors: recover the config that made them
        scaling = rope_scaling_from_factors(a, f"to_transformers: {lm.path}")
    rope_scaling = {"rope_type": "llama3", **asdict(scaling)} if scaling else None
    cfg = LlamaConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.dim,
        intermediate_size=a.hidden_dim,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=a.tie_word_embeddings,
        bos_token_id=lm.tokenizer.bos_id,
        eos_token_id=lm.tokenizer.eos_id,
        pad_token_id=lm.tokenizer.pad_id,
        attn_implementation=attn,
    )
    dtype = lm.model.tok_embeddings.weight.dtype
    hf = LlamaForCausalLM(cfg)
    sd = meta_to_hf_state_dict(lm.model.state_dict(), a)
    if a.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise PipelineInputError(f"to_transformers: weights do not map (missing {missing}, unexpected {unexpected})")
    if a.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(device=lm.model.tok_embeddings.weight.device, dtype=dtype).eval()


def save_pretrained(hf, directory: str | Path, tokenizer=None) -> None:
    """hf.save_pretrained(directory), with the RoPE settings also under their transformers 4.x keys, and our
    `tokenizer` (llama_3.Tokenizer) beside it as tokenizer.json for AutoTokenizer when one is given.

    transformers 5 writes RoPE only as `rope_parameters`; transformers 4.x (what TransformerLens 2.x and
    sae-dashboard pin) ignores that key and silently runs RoPE with theta 10000 and no Llama-3 scaling, so a
    model saved by 5 computes other activations there. transformers 5 reads the added keys back unchanged.
    The tokenizer: the `tokenizers` one we run (from tokenizer.json, or rebuilt from a GGUF's vocabulary) is
    saved as is; Meta's tiktoken tokenizer has no tokenizer.json form (use the Hugging Face checkpoint's)."""

    if tokenizer is not None and not isinstance(tokenizer.backend, HFBackend):
        raise PipelineInputError(
            f"save_pretrained: {tokenizer.source} is Meta's tiktoken tokenizer; no tokenizer.json can be written "
            "for it (use the Hugging Face checkpoint's tokenizer files)"
        )
    directory = Path(directory)
    hf.save_pretrained(directory)
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg.get("rope_parameters") or {})
    if rope:
        cfg["rope_theta"] = rope.pop("rope_theta", cfg.get("rope_theta"))
        cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        path.write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tok = tokenizer.backend.tok
        tok.encode_special_tokens = False  # the saved file parses special tokens, as AutoTokenizer users expect
        tok.save(str(directory / "tokenizer.json"))
        name = {i: tok.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name.get(tokenizer.bos_id),
            "eos_token": name.get(tokenizer.eos_id),
            "pad_token": tok.id_to_token(tokenizer.pad_id),
            "add_bos_token": tokenizer.add_bos_default,
            "model_max_length": hf.config.max_position_embeddings,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
