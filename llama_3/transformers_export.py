"""Our loaded model as a plain transformers LlamaForCausalLM (no quantization_config: a GGUF checkpoint comes
out dequantized), for TransformerLens, SAELens and anything else that wants a Hugging Face model.

    from llama_3 import load_model
    from llama_3.transformers_export import to_transformers
    hf = to_transformers(load_model(None))        # the embedded SmolLM2, from its GGUF
    hf.save_pretrained("smollm2-hf")               # + the tokenizer: AutoTokenizer needs the original repo's files
"""

from __future__ import annotations

from dataclasses import asdict

from llama_3.checkpoints import meta_to_hf_state_dict
from llama_3.errors import PipelineInputError


def to_transformers(lm, attn: str = "sdpa"):
    """LlamaForCausalLM with our weights (Meta -> HF names, q/k rows permuted), in the model's dtype and device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = lm.args
    if a.rope_freq_factors is not None:
        raise PipelineInputError(
            "to_transformers: the checkpoint gives explicit RoPE frequency divisors (GGUF rope_freqs), which a "
            "transformers config cannot state; load the Hugging Face or Meta checkpoint instead"
        )
    rope_scaling = {"rope_type": "llama3", **asdict(a.rope_scaling)} if a.rope_scaling else None
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
