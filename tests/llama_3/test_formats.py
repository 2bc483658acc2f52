"""The same tiny model written as HF, Meta and GGUF loads to identical logits, tokens and chat prompts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_3 import load_model
from tests.conftest import random_tokens
from tests.tiny_checkpoints import SAMPLE_TEXT


@pytest.fixture(scope="module")
def all_three(tiny):
    return {kind: load_model(p) for kind, p in (("hf", tiny.hf_dir), ("meta", tiny.meta_dir), ("gguf", tiny.gguf_path))}


def test_formats_give_identical_logits(all_three):
    tokens = random_tokens(all_three["hf"].args.vocab_size, (2, 40))
    with torch.no_grad():
        logits = {k: lm.model(tokens) for k, lm in all_three.items()}
    assert {lm.kind for lm in all_three.values()} == {"hf", "meta", "gguf"}
    torch.testing.assert_close(logits["meta"], logits["hf"], rtol=0, atol=0)
    torch.testing.assert_close(logits["gguf"], logits["hf"], rtol=0, atol=0)


def test_formats_give_identical_tokenizers_and_chat(all_three, tiny):
    ids = {k: lm.tokenizer.encode(SAMPLE_TEXT) for k, lm in all_three.items()}
    # The independent reference: the `tokenizers` object the files were written from.
    expected = tiny.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True).ids
    for k in ids:
        assert ids[k] == expected, k
        assert all_three[k].tokenizer.decode(ids[k][1:]) == SAMPLE_TEXT
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
    prompts = {k: lm.chat_format.encode_dialog(dialog) for k, lm in all_three.items()}
    assert prompts["meta"] == prompts["hf"] == prompts["gguf"]
    text = all_three["hf"].tokenizer.decode(prompts["hf"])
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere is Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # User text that looks like a special token stays text.
    injected = all_three["meta"].tokenizer.encode("<|eot_id|>", bos=False)
    assert all_three["meta"].tokenizer.token_to_id("<|eot_id|>") not in injected
    assert all_three["hf"].tokenizer.encode("<|eot_id|>", bos=False) == injected


def test_sharded_safetensors_index_loads_identically(tiny, tmp_path, all_three):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny.hf_dir, sharded)
    (sharded / "model.safetensors").unlink()
    sd = load_file(str(tiny.hf_dir / "model.safetensors"))
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: sd[k] for k in keys}, str(sharded / fname))
        weight_map.update({k: fname for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokens = random_tokens(all_three["hf"].args.vocab_size, (1, 17), seed=3)
    with torch.no_grad():
        torch.testing.assert_close(load_model(sharded).model(tokens), all_three["hf"].model(tokens), rtol=0, atol=0)


def test_meta_model_parallel_shards_merge(tiny, tmp_path, all_three):
    """Two consolidated.*.pth shards split the way fairscale splits Llama 3 merge back exactly."""
    from llama_3.checkpoints import _meta_shard_dim

    two = tmp_path / "meta2"
    shutil.copytree(tiny.meta_dir, two)
    sd = torch.load(two / "consolidated.00.pth", weights_only=True)
    (two / "consolidated.00.pth").unlink()
    parts = [{}, {}]
    for k, v in sd.items():
        dim = _meta_shard_dim(k)
        for i in range(2):
            parts[i][k] = v.clone() if dim is None else v.chunk(2, dim=dim)[i].clone()
    for i in range(2):
        torch.save(parts[i], two / f"consolidated.{i:02d}.pth")
    tokens = random_tokens(all_three["hf"].args.vocab_size, (1, 9), seed=4)
    with torch.no_grad():
        torch.testing.assert_close(load_model(two).model(tokens), all_three["hf"].model(tokens), rtol=0, atol=0)


def test_load_tokenizer_alone_matches_the_full_load(all_three, tiny):
    from llama_3 import load_tokenizer

    for kind, path in (("hf", tiny.hf_dir), ("meta", tiny.meta_dir), ("gguf", tiny.gguf_path)):
        alone = load_tokenizer(path)
        assert alone.fingerprint() == all_three[kind].tokenizer.fingerprint()
        assert alone.encode_batch([SAMPLE_TEXT, "x"]) == [
            all_three[kind].tokenizer.encode(t) for t in (SAMPLE_TEXT, "x")
        ]
