"""ModelArgs from Meta params.json and HF config.json, Llama-3 RoPE scaling from the files."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llama_3.args import args_from_hf_config, args_from_meta_params, rope_inverse_frequencies
from llama_3.errors import PipelineInputError

LLAMA_31_8B_PARAMS = {
    "dim": 4096,
    "ffn_dim_multiplier": 1.3,
    "multiple_of": 1024,
    "n_heads": 32,
    "n_kv_heads": 8,
    "n_layers": 32,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vocab_size": 128256,
}
LLAMA_32_3B_PARAMS = {
    "dim": 3072,
    "ffn_dim_multiplier": 1.0,
    "multiple_of": 256,
    "n_heads": 24,
    "n_kv_heads": 8,
    "n_layers": 28,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vocab_size": 128256,
}


def hf_config(hidden, inter, layers, heads, factor, tie):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "vocab_size": 128256,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
        "rope_scaling": {
            "factor": factor,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }


LLAMA_31_8B_HF = hf_config(4096, 14336, 32, 32, 8.0, False)
LLAMA_32_3B_HF = hf_config(3072, 8192, 28, 24, 32.0, True)


def reference_inv_freq(config: dict) -> torch.Tensor:
    """transformers' own llama3 RoPE initialisation for this config (the independent reference)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config), "cpu")
    return inv_freq.float()


def write(tmp_path, name, data):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("hf, factor", [(LLAMA_31_8B_HF, 8.0), (LLAMA_32_3B_HF, 32.0)])
def test_hf_config_rope_scaling_matches_transformers(tmp_path, hf, factor):
    args = args_from_hf_config(write(tmp_path, "config.json", hf))
    assert args.rope_scaling.factor == factor
    ours = torch.tensor(rope_inverse_frequencies(args), dtype=torch.float32)
    torch.testing.assert_close(ours, reference_inv_freq(hf), rtol=1e-6, atol=0)


@pytest.mark.parametrize("params, hf", [(LLAMA_31_8B_PARAMS, LLAMA_31_8B_HF), (LLAMA_32_3B_PARAMS, LLAMA_32_3B_HF)])
def test_meta_params_match_hf_config(tmp_path, params, hf, caplog):
    """Meta's params.json (no factor in it) gives the same architecture as the HF config of the same model."""
    with caplog.at_level(logging.WARNING):
        meta = args_from_meta_params(write(tmp_path, "params.json", params))
    ref = args_from_hf_config(write(tmp_path, "hf/config.json", hf))
    assert meta.hidden_dim == ref.hidden_dim
    assert meta.rope_scaling == ref.rope_scaling
    assert (meta.dim, meta.n_layers, meta.n_heads, meta.n_kv_heads, meta.vocab_size) == (
        ref.dim,
        ref.n_layers,
        ref.n_heads,
        ref.n_kv_heads,
        ref.vocab_size,
    )
    assert any("factor=" in r.getMessage() for r in caplog.records), "the inferred factor must be logged"
    torch.testing.assert_close(torch.tensor(rope_inverse_frequencies(meta)), reference_inv_freq(hf), rtol=1e-6, atol=0)


def test_meta_params_take_factor_from_hf_config_one_folder_up(tmp_path):
    """HF repos ship Meta's files under original/; the config.json beside them states the factor."""
    odd = dict(LLAMA_31_8B_PARAMS)  # a shape we would otherwise map to 8
    write(
        tmp_path, "config.json", {**LLAMA_31_8B_HF, "rope_scaling": {**LLAMA_31_8B_HF["rope_scaling"], "factor": 16.0}}
    )
    args = args_from_meta_params(write(tmp_path, "original/params.json", odd))
    assert args.rope_scaling.factor == 16.0


def test_meta_params_explicit_factor_wins(tmp_path):
    args = args_from_meta_params(write(tmp_path, "params.json", {**LLAMA_31_8B_PARAMS, "rope_scaling_factor": 4.0}))
    assert args.rope_scaling.factor == 4.0
    assert not any("factor" in d for d in args.decisions)


def test_unscaled_when_use_scaled_rope_absent(tmp_path):
    p = {k: v for k, v in LLAMA_31_8B_PARAMS.items() if k != "use_scaled_rope"}
    args = args_from_meta_params(write(tmp_path, "params.json", p))
    assert args.rope_scaling is None
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    torch.testing.assert_close(torch.tensor(rope_inverse_frequencies(args)), base)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: {**p, "moe_experts": 8}, "unknown field"),
        (lambda p: {**p, "use_scaled_rope": False, "rope_scaling_factor": 8.0}, "use_scaled_rope is false"),
        (lambda p: {k: v for k, v in p.items() if k != "dim"}, "missing required field 'dim'"),
        (lambda p: {**p, "n_heads": 33}, "not divisible"),
        (lambda p: {**p, "dim": "4096"}, "must be int"),
    ],
)
def test_bad_meta_params(tmp_path, mutate, message):
    path = write(tmp_path, "params.json", mutate(LLAMA_31_8B_PARAMS))
    with pytest.raises(PipelineInputError, match=message) as e:
        args_from_meta_params(path)
    assert str(path) in str(e.value) or "model args" in str(e.value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: {**c, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
        (lambda c: {**c, "rope_scaling": {"rope_type": "llama3"}}, "no 'factor'"),
        (lambda c: {**c, "model_type": "mistral"}, "expected 'llama'"),
        (lambda c: {**c, "head_dim": 64}, "head_dim=64"),
        (lambda c: {**c, "attention_bias": True}, "attention_bias"),
    ],
)
def test_bad_hf_config(tmp_path, mutate, message):
    with pytest.raises(PipelineInputError, match=message):
        args_from_hf_config(write(tmp_path, "config.json", mutate(LLAMA_31_8B_HF)))


def test_unknown_hf_keys_are_a_logged_decision(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        args = args_from_hf_config(write(tmp_path, "config.json", {**LLAMA_31_8B_HF, "some_new_key": 1}))
    assert any("some_new_key" in d for d in args.decisions)
    assert any("some_new_key" in r.getMessage() for r in caplog.records)
