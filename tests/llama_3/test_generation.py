"""KV cache, batching with unequal prompt lengths, sampling and stop tokens."""

from __future__ import annotations

import torch

from llama_3.generation import Generator, sample_top_p
from tests.conftest import random_tokens


def test_kv_cache_incremental_equals_full_forward(tiny_model):
    model = tiny_model.model
    tokens = random_tokens(model.args.vocab_size, (2, 30), seed=11)
    with torch.no_grad():
        full = model(tokens)
        model.allocate_kv_cache(2, 30)
        try:
            chunks = [model(tokens[:, :12], 0)]  # prefill
            chunks += [model(tokens[:, 12:20], 12)]  # a multi-token chunk on top of the cache
            chunks += [model(tokens[:, t : t + 1], t) for t in range(20, 30)]  # one token at a time
        finally:
            model.free_kv_cache()
    incremental = torch.cat(chunks, dim=1)
    assert (incremental - full).abs().max().item() < 1e-4


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with full forwards and no cache: the slow, obviously-right reference."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_batched_greedy_with_unequal_lengths_equals_one_by_one(tiny_model):
    gen = Generator(tiny_model)
    V = tiny_model.args.vocab_size
    prompts = [random_tokens(V, (n,), seed=n).tolist() for n in (3, 11, 7, 1)]
    no_stop = set()
    batched = gen.generate(prompts, max_new_tokens=12, temperature=0, stop_tokens=no_stop)
    for p, c in zip(prompts, batched):
        single = gen.generate([p], max_new_tokens=12, temperature=0, stop_tokens=no_stop)[0]
        assert c.tokens == single.tokens
        assert c.tokens == greedy_reference(tiny_model.model, p, 12)
        assert c.finish_reason == "length"


def test_per_sequence_stop_tokens(tiny_model):
    gen = Generator(tiny_model)
    prompts = [random_tokens(tiny_model.args.vocab_size, (5,), seed=s).tolist() for s in (1, 2)]
    free = gen.generate(prompts, max_new_tokens=10, temperature=0, stop_tokens=set())
    stop_first = free[0].tokens[3]
    out = gen.generate(prompts, max_new_tokens=10, temperature=0, stop_tokens=[{stop_first}, set()])
    assert out[0].tokens == free[0].tokens[: free[0].tokens.index(stop_first)]
    assert out[0].finish_reason == "stop"
    assert out[1].tokens == free[1].tokens


def test_sampling_is_seeded_and_top_p_limits_choices(tiny_model):
    gen = Generator(tiny_model)
    prompt = [random_tokens(tiny_model.args.vocab_size, (6,), seed=9).tolist()]
    a = gen.generate(prompt, max_new_tokens=15, temperature=1.0, top_p=0.95, seed=123, stop_tokens=set())
    b = gen.generate(prompt, max_new_tokens=15, temperature=1.0, top_p=0.95, seed=123, stop_tokens=set())
    c = gen.generate(prompt, max_new_tokens=15, temperature=1.0, top_p=0.95, seed=7, stop_tokens=set())
    assert a[0].tokens == b[0].tokens
    assert a[0].tokens != c[0].tokens
    # A nucleus too small to hold more than the top token is greedy.
    tiny_p = gen.generate(prompt, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5, stop_tokens=set())
    assert tiny_p[0].tokens == gen.generate(prompt, max_new_tokens=8, temperature=0, stop_tokens=set())[0].tokens


def test_sample_top_p_never_picks_outside_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_top_p(probs.clone(), 0.7, g)
    counts = torch.bincount(picks, minlength=4).float() / len(picks)
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.05


def test_streaming_text_equals_final_text(tiny_model):
    gen = Generator(tiny_model)
    pieces: list[str] = []
    out = gen.text_completion(
        ["The fox"], on_text=lambda b, d: pieces.append(d), max_new_tokens=20, temperature=0, stop_tokens=set()
    )
    assert "".join(pieces) == out[0].text


def test_generation_with_splice_changes_output_and_capture_is_pre_splice(tiny_model):
    gen = Generator(tiny_model)
    prompt = [random_tokens(tiny_model.args.vocab_size, (6,), seed=4).tolist()]
    plain = gen.generate(prompt, max_new_tokens=8, temperature=0, stop_tokens=set())
    # An identity splice changes nothing; a large constant shift changes the continuation.
    same = gen.generate(prompt, max_new_tokens=8, temperature=0, stop_tokens=set(), splice={"resid_pre.2": lambda x: x})
    shift = torch.randn(tiny_model.args.dim, generator=torch.Generator().manual_seed(1)) * 50
    steered = gen.generate(
        prompt, max_new_tokens=8, temperature=0, stop_tokens=set(), splice={"resid_pre.2": lambda x: x + shift}
    )
    assert same[0].tokens == plain[0].tokens
    assert steered[0].tokens != plain[0].tokens
