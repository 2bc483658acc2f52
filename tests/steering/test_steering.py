"""Steering through an SAE splice: exact clean model without steering, each mode raises its latent;
generation, inspection, the inference CLI and the steering evaluation."""

from __future__ import annotations

import json
import sys
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import random_tokens

from llama_3 import PipelineInputError, load_model
from llama_3.generation import Generator
from llama_3_inference import InferenceConfig
from llama_3_inference import main as inference_main
from pipeline.sae.model import SaeConfig, TopKSae
from pipeline.steering.concept import concept_words
from pipeline.steering.session import Session
from pipeline.steering.splice import (
    SteerableSae,
    SteeringEntry,
    inspect_tokens,
    sae_splice,
    steered_reconstruction,
    steering_batch,
)

HOOK = "resid_pre.1"


def dense_codes(sae, x: torch.Tensor) -> torch.Tensor:
    """x [T, d] -> the SAE's codes as a dense [T, n_latents]."""
    out = sae(x.float())
    return torch.zeros(len(x), sae.cfg.n_latents, device=x.device).scatter_(1, out.indices, out.values)


@torch.inference_mode()
def continuation_activations(
    model, sae, splice, prompt: list[int], continuation: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean model reads prompt + continuation. Returns, for the continuation's tokens, the SAE
    codes [T_cont, n_latents] of (the text's own activations, the stream after the splice): the
    clean capture is what the splice saw during generation, the splice of it what the model saw."""
    return encode_continuations(model, sae, splice, [prompt], [continuation])[0]


@torch.inference_mode()
def encode_continuations(
    model, sae, splice, prompts: list[list[int]], continuations: list[list[int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """continuation_activations for a batch of rows in one forward: right-padded, so every real token
    sees only its own row's earlier tokens (causal attention); `splice` steers row b as the generation
    of row b was steered."""
    seqs = [p + c for p, c in zip(prompts, continuations)]
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long, device=device)
    for b, seq in enumerate(seqs):
        tokens[b, : len(seq)] = torch.tensor(seq, device=device)
    x = model.capture(tokens, [sae.cfg.hook_point])[sae.cfg.hook_point].float()  # [R, T, d]
    positions = torch.arange(tokens.shape[1], device=device)[None].expand(len(seqs), -1)
    stream = splice(x, positions)
    out = []
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        span = slice(len(p), len(p) + len(c))
        out.append((dense_codes(sae, x[b, span]), dense_codes(sae, stream[b, span])))
    return out


@pytest.fixture(scope="module")
def lm_and_sae(tiny):
    lm = load_model(tiny.hf_dir)
    torch.manual_seed(0)
    sae = TopKSae(SaeConfig(d_model=lm.args.dim, n_latents=64, k=4, hook_point=HOOK, model=lm.identity())).eval()
    return lm, sae


def test_unsteered_splice_with_error_term_is_exactly_the_clean_model(lm_and_sae):
    lm, sae = lm_and_sae
    tokens = random_tokens(lm.args.vocab_size, (3, 12))
    with torch.no_grad():
        clean = lm.model(tokens)
        spliced, _ = lm.model.run_with_hooks(tokens, splice={HOOK: sae_splice(sae)})
        pure, _ = lm.model.run_with_hooks(tokens, splice={HOOK: sae_splice(sae, keep_error=False)})
        reference, _ = lm.model.run_with_hooks(tokens, splice={HOOK: sae.reconstruct})
    assert torch.equal(spliced, clean)
    torch.testing.assert_close(pure, reference)
    assert not torch.allclose(pure, clean)  # a random SAE loses a lot


@pytest.mark.parametrize(
    "entry", [SteeringEntry(5, "h_bias", 20.0), SteeringEntry(5, "clamp", 10.0), SteeringEntry(5, "add", 10.0)]
)
def test_each_mode_raises_its_latent_in_the_steered_stream(lm_and_sae, entry):
    lm, sae = lm_and_sae
    tokens = random_tokens(lm.args.vocab_size, (2, 10), seed=1)
    with torch.no_grad():
        x = lm.model.capture(tokens, [HOOK])[HOOK]
        steered = x + (steered_reconstruction(sae, x, [entry]) - sae(x.reshape(-1, x.shape[-1])).x_hat.reshape(x.shape))

        def activation(stream):
            out = sae(stream.reshape(-1, stream.shape[-1]))
            return (out.values * (out.indices == 5)).sum(-1).mean()

        assert activation(steered) > activation(x) + 1.0
        # only masked positions change
        mask = torch.zeros(2, 10, dtype=torch.bool)
        mask[:, 6:] = True
        logits_masked, _ = lm.model.run_with_hooks(tokens, splice={HOOK: sae_splice(sae, [entry], position_mask=mask)})
        clean = lm.model(tokens)
        assert torch.equal(logits_masked[:, :6], clean[:, :6]) and not torch.allclose(
            logits_masked[:, 6:], clean[:, 6:]
        )


def test_bad_steering_entries(lm_and_sae):
    _, sae = lm_and_sae
    with pytest.raises(PipelineInputError, match="LATENT:MODE:STRENGTH"):
        SteeringEntry.parse("five:clamp:1")
    with pytest.raises(PipelineInputError, match="mode must be one of"):
        sae_splice(sae, [SteeringEntry.parse("3:boost:1")])
    with pytest.raises(PipelineInputError, match="latents 0..63"):
        sae_splice(sae, [SteeringEntry.parse("64:clamp:1")])
    assert SteeringEntry.parse("7:2.5") == SteeringEntry(7, "h_bias", 2.5)


# ---- generation, inspection, CLI, evaluation ---------------------------------------------------


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, lm_and_sae):
    lm, _ = lm_and_sae
    torch.manual_seed(1)
    sae = TopKSae(
        SaeConfig(
            d_model=lm.args.dim, n_latents=48, k=4, hook_point=HOOK, model=lm.identity(), exclude_first_positions=1
        )
    )
    out = tmp_path_factory.mktemp("sae") / "sae"
    sae.save(out)
    return out


def write_meanings(directory: Path, sae_dir: Path, meanings: dict[int, tuple[str, float]]) -> None:
    from pipeline.sae.formats import sae_sha256

    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "sae_sha256": sae_sha256(sae_dir),
        "explainer": "test",
        "latents": [{"latent": i, "meaning": m, "certainty": c, "score": None} for i, (m, c) in meanings.items()],
    }
    (directory / "test.json").write_text(json.dumps(doc))


def session_for(tiny, sae_dir, meanings_dir) -> Session:
    return Session.open(str(tiny.hf_dir), str(sae_dir), str(meanings_dir), "cpu", "float32")


PROMPTS = [[5, 9, 13, 2], [7, 3, 11]]


def test_unsteered_generation_with_the_sae_is_the_clean_model_and_compare_rows_match(tiny, sae_dir, tmp_path):
    session = session_for(tiny, sae_dir, tmp_path / "none")
    clean = Generator(session.loaded).generate(PROMPTS, max_new_tokens=8, temperature=0)
    spliced = session.complete(PROMPTS, [], max_new_tokens=8, temperature=0)
    assert [c.tokens for c in clean] == [s.tokens for _, s in spliced]
    pairs = session.complete(PROMPTS, [SteeringEntry(3, "clamp", 30.0)], max_new_tokens=8, temperature=0)
    assert [p.tokens for p, _ in pairs] == [c.tokens for c in clean]  # the unsteered rows of a side-by-side batch
    assert any(s.tokens != c.tokens for (_, s), c in zip(pairs, clean))


@pytest.mark.parametrize("mode,strength", [("h_bias", 20.0), ("clamp", 10.0), ("add", 10.0)])
def test_each_mode_raises_the_target_latent_on_the_continuation(tiny, sae_dir, tmp_path, mode, strength):
    """Generate steered and unsteered; the target latent's activation in the stream the model saw at
    the continuation's tokens (clean capture re-run through the splice, re-encoded) must rise."""
    session = session_for(tiny, sae_dir, tmp_path / "none")
    sae, latent = session.steerable.sae, 7
    entry = SteeringEntry(latent, mode, strength)

    def continuation_activation(entries):
        batch, splice = steering_batch(sae, PROMPTS, entries, compare=False)
        out = session.gen.generate(batch, splice={HOOK: splice}, max_new_tokens=6, temperature=0)
        acts = [
            continuation_activations(session.loaded.model, sae, splice, p, c.tokens)[1][:, latent]
            for p, c in zip(PROMPTS, out)
        ]
        return torch.cat(acts).mean().item(), out

    base, _ = continuation_activation([])
    steered, out = continuation_activation([entry])
    assert steered > base + 1.0
    # where the steering applies: "generated" leaves the prompt (hence the first new token) alone
    first = session.complete(PROMPTS, [entry], steer_on="generated", compare=True, max_new_tokens=1, temperature=0)
    assert all(p.tokens == s.tokens for p, s in first)


def test_inspection_equals_the_dense_sae_on_the_clean_stream(tiny, sae_dir, tmp_path):
    session = session_for(tiny, sae_dir, tmp_path / "none")
    sae, model = session.steerable.sae, session.loaded.model
    tokens = [4, 8, 15, 16, 23, 42]
    with torch.no_grad():
        x = model.capture(torch.tensor([tokens]), [HOOK])[HOOK][0]
        pre = sae.normalize_input(x.float())[0] - sae.b_pre
        dense = pre @ sae.W_enc.t() + sae.b_enc
    rows = inspect_tokens(model, sae, tokens, top=3)
    assert rows[0] == []  # the attention sink the SAE never saw
    for t in range(1, len(tokens)):
        kept = dense[t].topk(sae.cfg.k)
        expected = sorted(
            ((int(i), float(v)) for v, i in zip(kept.values, kept.indices) if v > 0), key=lambda p: -p[1]
        )[:3]
        assert [i for i, _ in rows[t]] == [i for i, _ in expected]
        assert [v for _, v in rows[t]] == pytest.approx([v for _, v in expected], rel=1e-4, abs=1e-5)
    clamped = inspect_tokens(model, sae, tokens, [SteeringEntry(11, "clamp", 99.0)], steer_from=3, top=3)
    assert all(r[0] == (11, 99.0) for r in clamped[3:])
    assert clamped[1:3] == rows[1:3]  # before steer_from nothing is steered


def test_splice_leaves_the_attention_sink_untouched(tiny, sae_dir, tmp_path):
    session = session_for(tiny, sae_dir, tmp_path / "none")
    tokens = random_tokens(session.loaded.args.vocab_size, (2, 7), seed=3)
    with torch.no_grad():
        clean = session.loaded.model(tokens)
        pure, _ = session.loaded.model.run_with_hooks(
            tokens, splice={HOOK: sae_splice(session.steerable.sae, keep_error=False)}
        )
    assert torch.equal(pure[:, 0], clean[:, 0]) and not torch.allclose(pure[:, 1:], clean[:, 1:])


def test_meaning_search_keywords_and_ranking(tiny, sae_dir, tmp_path):
    write_meanings(
        tmp_path / "m",
        sae_dir,
        {
            3: ('the tokens "bone", "bones" (often after "the")', 0.9),
            8: ("rivers and lakes in Europe", 0.95),
            9: ("Bone marrow", 0.5),
        },
    )
    session = session_for(tiny, sae_dir, tmp_path / "m")
    s: SteerableSae = session.steerable
    assert [h["latent"] for h in s.search("bone")] == [3, 9]
    assert [h["latent"] for h in s.search("RIVERS europe")] == [8]
    assert s.search("8")[0]["latent"] == 8 and s.search("4000") == []
    assert s.best_latents(2) == [8, 3]
    # what the steering evaluation steers towards: each meaning form's concept words
    assert concept_words('the tokens "bone", "bones" (often after "the")') == ["bone", "bones"]
    assert concept_words("rivers and lakes in Europe") == ["rivers", "lakes", "europe"]
    museum = 'the word "museum" ("the museum", "museum in"); also "gallery", "o", "the"; context: national, york'
    assert concept_words(museum) == ["museum", "gallery"]
    assert concept_words('plant life — "plants", "of", "plant"; flowering, genus') == ["plant", "life", "plants"]
    assert concept_words('the punctuation "," (as in ", and")') == concept_words('the word piece "g" inside') == []


def test_inference_cli_steers_inspects_and_chats(tiny, sae_dir, tmp_path, capsys, monkeypatch):
    meanings = tmp_path / "m"
    write_meanings(meanings, sae_dir, {3: ("numbers", 0.9)})
    base = dict(model=str(tiny.hf_dir), sae=str(sae_dir), meanings=str(meanings), device="cpu", max_new_tokens=5)
    out = inference_main(InferenceConfig(**base, prompt=["hello world", "a b"], steer=["3:clamp:25"], inspect=2))
    assert len(out["text"]) == 2 and len(out["text_unsteered"]) == 2 and len(out["inspection"]) == 2
    assert all(
        row["latents"][0]["latent"] == 3 and row["latents"][0]["meaning"] == "numbers" for row in out["inspection"][0]
    )
    printed = capsys.readouterr().out
    assert "unsteered >>>" in printed and "steered   >>>" in printed and "3:clamp:25 (numbers)" in printed
    assert inference_main(InferenceConfig(**base, search="NUMB"))["search"][0]["latent"] == 3
    with pytest.raises(PipelineInputError, match="--steer needs --sae"):
        inference_main(InferenceConfig(model=str(tiny.hf_dir), device="cpu", steer=["3:clamp:1"], prompt=["x"]))
    with pytest.raises(PipelineInputError, match="--inspect / --search need --sae"):
        inference_main(InferenceConfig(model=str(tiny.hf_dir), device="cpu", inspect=3))
    with pytest.raises(PipelineInputError, match="--steer-on"):
        inference_main(InferenceConfig(**base, steer_on="middle"))
    # a multi-turn chat on stdin, with commands, on a checkpoint that has a chat format (Meta layout)
    lm = load_model(tiny.meta_dir)
    chat_sae = TopKSae(SaeConfig(d_model=lm.args.dim, n_latents=16, k=2, hook_point=HOOK, model=lm.identity()))
    chat_sae.save(tmp_path / "chat_sae")
    monkeypatch.setattr(
        sys, "stdin", StringIO("hi there\n/steer 2:add:5\n/steer 99:add:1\nand again\n/reset\n/quit\nnever read\n")
    )
    dialog = inference_main(
        InferenceConfig(
            model=str(tiny.meta_dir),
            sae=str(tmp_path / "chat_sae"),
            meanings=str(meanings),
            device="cpu",
            max_new_tokens=4,
            interactive=True,
        )
    )["chat"]
    assert dialog == []  # /reset cleared it
    printed = capsys.readouterr().out
    assert printed.count("assistant> ") == 2 and "(steering: 2:add:5)" in printed and "error: --steer 99" in printed


@pytest.mark.parametrize("keep_error", [True, False])
def test_rows_steered_differently_in_one_batch_equal_each_steered_alone(tiny, sae_dir, tmp_path, keep_error):
    """sae_splice(row_entries=): every batch row its own entries (or none). Each row's continuation,
    its re-read codes and the stream the model saw equal a generation of that row's prompts alone with
    its entries shared by the batch, in every mode."""
    session = session_for(tiny, sae_dir, tmp_path / "none")
    sae = session.steerable.sae
    sampling = {"max_new_tokens": 6, "temperature": 0.0, "seed": 0}
    groups = [
        [],
        [SteeringEntry(7, "h_bias", 20.0)],
        [SteeringEntry(7, "clamp", 10.0)],
        [SteeringEntry(3, "add", 10.0)],
    ]
    groups.append([SteeringEntry(7, "clamp", 10.0), SteeringEntry(3, "add", 5.0), SteeringEntry(5, "h_bias", 8.0)])
    rows = [(p, g) for g in groups for p in PROMPTS]
    row_splice = sae_splice(sae, keep_error=keep_error, row_entries=[g for _, g in rows])
    out = session.gen.generate([p for p, _ in rows], splice={HOOK: row_splice}, **sampling)
    reread = encode_continuations(session.loaded.model, sae, row_splice, [p for p, _ in rows], [c.tokens for c in out])
    batched = SimpleNamespace(
        tokens=[c.tokens for c in out], codes=[a for a, _ in reread], stream_codes=[b for _, b in reread]
    )
    for i, entries in enumerate(groups):
        batch, splice = steering_batch(sae, PROMPTS, entries, keep_error, compare=False)
        out = session.gen.generate(batch, splice={HOOK: splice}, **sampling)
        for j, (p, c) in enumerate(zip(PROMPTS, out)):
            r = i * len(PROMPTS) + j
            assert batched.tokens[r] == c.tokens, (entries, p)
            codes, stream = continuation_activations(session.loaded.model, sae, splice, p, c.tokens)
            torch.testing.assert_close(batched.codes[r], codes, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.stream_codes[r], stream, rtol=1e-4, atol=1e-4)
    assert any(batched.tokens[r] != batched.tokens[r % len(PROMPTS)] for r in range(len(PROMPTS), len(rows)))
