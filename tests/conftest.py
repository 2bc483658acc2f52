from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.tiny_checkpoints import make_hf_reference, write_gguf_checkpoint, write_hf_tokenizer, write_meta_checkpoint


@dataclass
class TinyCheckpoints:
    reference: torch.nn.Module  # transformers LlamaForCausalLM, the independent implementation
    tokenizer: object  # tokenizers.Tokenizer used to write all three formats
    hf_dir: Path
    meta_dir: Path
    gguf_path: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyCheckpoints:
    """One random tiny Llama 3 written as an HF dir (by transformers), a Meta dir and a GGUF file."""
    from llama_3 import load_model

    root = tmp_path_factory.mktemp("tiny")
    reference, tok = make_hf_reference(seed=0)
    hf_dir = root / "hf"
    reference.save_pretrained(hf_dir)
    write_hf_tokenizer(tok, hf_dir)
    loaded = load_model(hf_dir)
    sd = loaded.model.state_dict()
    write_meta_checkpoint(root / "meta", sd, loaded.args, tok)
    write_gguf_checkpoint(root / "tiny.gguf", sd, loaded.args, tok)
    return TinyCheckpoints(reference, tok, hf_dir, root / "meta", root / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_model(tiny):
    from llama_3 import load_model

    return load_model(tiny.hf_dir)


def random_tokens(n_vocab: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_vocab, shape, generator=g)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny):
    """Every stage run once, uninterrupted, on the tiny model: (root, stages, snapshots, seconds)."""
    from tiny_pipeline import build_reference

    return build_reference(tmp_path_factory.mktemp("tiny_pipeline"), tiny.hf_dir)
