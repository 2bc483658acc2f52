"""The AxBench-style steering evaluation: its parts against brute-force references, then the whole stage."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import random_tokens

import pipeline.steering.stage as steering_stage
from llama_3 import PipelineInputError, load_model
from llama_3.hooks import Splice
from pipeline.core.tokenization import Tokenization
from pipeline.sae.model import SaeConfig, TopKSae
from pipeline.steering.concept import common_words, concept_tokens, concept_words, is_function_fragment, related_words
from pipeline.steering.evaluation import Row, add_strength, best_factor, read_continuations
from pipeline.steering.judge import JudgeItem, OfflineJudge, harmonic_mean, loop_share, rate, without_words
from pipeline.steering.output_score import output_scores, promoted_tokens, stream_point
from pipeline.steering.splice import SteeringEntry, hook_activations, sae_splice
from pipeline.steering.vectors import (
    capture_sums,
    diffmean_directions,
    hook_sums,
    residual_norm,
    sae_directions,
    vector_splice,
)

HOOK = "resid_pre.1"
PROMPTS = [[5, 9, 13, 2], [7, 3, 11], [4, 4, 8, 1, 6]]


@pytest.fixture(scope="module")
def lm(tiny):
    return load_model(tiny.hf_dir)


@pytest.fixture(scope="module")
def sae(lm):
    torch.manual_seed(1)
    cfg = SaeConfig(d_model=lm.args.dim, n_latents=48, k=4, hook_point=HOOK, model=lm.identity())
    cfg.exclude_first_positions, cfg.input_scale = 1, 0.7
    return TopKSae(cfg).eval()


def test_forward_from_a_hook_equals_the_full_forward(lm):
    tokens = random_tokens(lm.args.vocab_size, (2, 9), seed=3)
    with torch.inference_mode():
        full = lm.model(tokens)
        for layer in (0, 1, lm.args.n_layers):
            x = (
                lm.model.capture(tokens, [f"resid_pre.{layer}"])[f"resid_pre.{layer}"]
                if layer < lm.args.n_layers
                else None
            )
            if x is None:  # after the last block: only the final norm and the head
                x = lm.model.capture(tokens, [f"resid_post.{layer - 1}"])[f"resid_post.{layer - 1}"]
            torch.testing.assert_close(lm.model.forward_from(x, layer), full, rtol=1e-5, atol=1e-5)
    assert stream_point("resid_post.0", 2) == ("resid_post.0", 1, False) == stream_point("mlp_out.0", 2)
    assert stream_point("resid_pre.1", 2) == ("resid_pre.1", 1, False)
    assert stream_point("attn_out.1", 2) == ("resid_mid.1", 1, True) == stream_point("resid_mid.1", 2)
    with pytest.raises(PipelineInputError, match="norm's output"):
        stream_point("attn_norm.1", 2)
    # resumed mid-block: block 1's MLP and what follows, from the stream at resid_mid.1
    mid = lm.model.capture(tokens, ["resid_mid.1"])["resid_mid.1"]
    torch.testing.assert_close(lm.model.forward_from(mid, 1, mid=True), full, rtol=1e-5, atol=1e-5)


def test_vector_splice_zero_rows_are_clean_and_rows_do_not_see_each_other(lm):
    """A batch of rows with different offsets (one zero) gives each row what it gets alone, and the zero
    row exactly the clean model; the sink position is never changed."""
    from llama_3.generation import Generator

    gen = Generator(lm)
    d = lm.args.dim
    g = torch.Generator().manual_seed(0)
    offsets = torch.stack([torch.zeros(d), 3 * torch.randn(d, generator=g), 3 * torch.randn(d, generator=g)])
    sampling = {"max_new_tokens": 6, "temperature": 0.0}
    batch = gen.generate(PROMPTS, splice={HOOK: vector_splice(offsets, 1)}, **sampling)
    clean = gen.generate(PROMPTS[:1], **sampling)
    assert batch[0].tokens == clean[0].tokens
    for b in range(1, 3):
        alone = gen.generate([PROMPTS[b]], splice={HOOK: vector_splice(offsets[b : b + 1], 1)}, **sampling)
        assert alone[0].tokens == batch[b].tokens
    assert batch[1].tokens != gen.generate([PROMPTS[1]], **sampling)[0].tokens  # the offset is large enough to act
    x = torch.randn(3, 5, d)
    out = vector_splice(offsets, 1)(x, torch.arange(5)[None].expand(3, -1))
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out[0], x[0])
    torch.testing.assert_close(out[1:, 1:], x[1:, 1:] + offsets[1:, None])


def test_sae_add_at_the_recommended_strength_is_the_unit_decoder_row_vector(lm, sae):
    """What the evaluation adds (factor x norm x unit row) is the Gradio page's `add` entry at add_strength."""
    tokens = random_tokens(lm.args.vocab_size, (2, 7), seed=5)
    positions = torch.arange(7)[None].expand(2, -1)
    with torch.inference_mode():
        x = lm.model.capture(tokens, [HOOK])[HOOK]
        latent, offset_norm = 11, 2.5
        via_sae = sae_splice(sae, [SteeringEntry(latent, "add", add_strength(sae, latent, offset_norm))])(x, positions)
        via_vector = vector_splice(offset_norm * sae_directions(sae, [latent]).expand(2, -1), 1)(x, positions)
    torch.testing.assert_close(via_sae, via_vector, rtol=1e-5, atol=1e-5)
    assert float((via_vector[:, 1:] - x[:, 1:]).norm(dim=-1).mean()) == pytest.approx(offset_norm, rel=1e-5)


def test_output_scores_equal_full_forwards_with_the_splice(lm, sae):
    latents = [0, 5, 17, 30]
    dirs = sae_directions(sae, latents)
    ragged = [[3, 9], [], [7], [1, 2, 4, 8]]  # concept-token sets of any length; an empty one scores 0
    with torch.inference_mode():
        promoted = promoted_tokens(lm.model, dirs, 3)
        scores = output_scores(lm.model, HOOK, dirs, PROMPTS, 4.0, 1, [promoted.tolist(), ragged], batch_rows=3)
        w_lens = lm.model.output.weight.float() @ (lm.model.norm.weight.float()[:, None] * dirs.t())  # [V, n]
        for i in range(len(latents)):
            ids = w_lens[:, i].topk(3).indices
            assert set(promoted[i].tolist()) == set(ids.tolist())
            for s, token_set in enumerate((ids.tolist(), ragged[i])):
                expected = 0.0
                for p in PROMPTS:
                    tokens = torch.tensor([p])
                    clean = lm.model(tokens)[0, -1].float().softmax(-1)
                    splice = Splice(lambda x, i=i: x.float() + 4.0 * dirs[i], skip_first_positions=1)
                    steered, _ = lm.model.run_with_hooks(tokens, splice={HOOK: splice})
                    gain = steered[0, -1].float().softmax(-1)[token_set].sum() - clean[token_set].sum()
                    expected += float(gain) / len(PROMPTS)
                assert float(scores[s, i]) == pytest.approx(expected, abs=1e-5)


def test_concept_tokens_start_the_rare_key_words_of_a_meaning(tiny):
    from llama_3 import load_model as load

    tok = load(tiny.hf_dir).tokenizer
    texts = ["the cat sat", "the dog ran", "the film was long", "a cat and the dog", "the end"]
    common = common_words(texts, share=0.4, min_count=2)
    assert common == {"the", "cat", "dog"}  # in >= 2 texts and >= 40% of the 5
    meaning = 'the tokens "capital", "cat", "the", "moon" (often after "berlin")'  # "the": not a key word
    expected = []
    variants = [v for w in ("capital", "moon", "berlin") for v in (f" {w}", f" {w.capitalize()}", w)]
    for variant in variants:  # the rare words, in order
        first = tok.encode(variant, bos=False)[0]
        if len(tok.decode([first]).strip()) >= 3 and first not in expected:
            expected.append(first)
    assert [tok.decode([t]) for t in expected] == [
        " capital",
        "cap",
        " Moo",
        " Ber",
    ]  # the tiny BPE's pieces of >= 3 letters
    assert concept_tokens(concept_words(meaning), tok, common) == expected
    assert concept_tokens(concept_words('the tokens "cat", "the"'), tok, common) == []
    # a word whose first token is a function word or the start of one (" theria" -> " the") says nothing
    for word in ("theria", "whereupon", "herons", "anderson", "thus"):
        first = tok.encode(" " + word, bos=False)[0]
        if is_function_fragment(tok.decode([first])):
            assert first not in concept_tokens([word], tok, frozenset())
    assert is_function_fragment(" the") and is_function_fragment("Wh") and is_function_fragment(" ")
    assert not is_function_fragment(" Moo") and not is_function_fragment("theatre")
    assert concept_tokens(["capital", "cat", "dog"], tok, common) == []  # 1 rare word of 3
    # secondary words join the concept only when they belong with the first ("john; also guinea": not one concept)
    vec = {"john": [1.0, 0.0], "jack": [0.8, 0.6], "guinea": [0.0, 1.0]}
    assert related_words(["john", "jack", "guinea"], lambda ws: [torch.tensor(vec[w]) for w in ws]) == ["john", "jack"]


def test_diffmean_and_residual_norm_equal_per_sentence_brute_force(lm, tiny):
    from llama_3 import load_model as load

    tok = load(tiny.hf_dir).tokenizer
    texts = ["a b c d", "hello there", "one two three four five", "x", "the end of it"]
    tokenization = Tokenization(add_bos=True, max_tokens=4, exclude_first_positions=1)
    sums, counts = hook_sums(lm.model, HOOK, tokenization, tok, texts, batch_tokens=8)
    per_text = []
    for ids in tokenization.encode(tok, texts):
        a = hook_activations(lm.model, HOOK, ids)[2:]  # BOS and the excluded first text position
        per_text.append(a)
        assert len(a) <= 3
    for i, a in enumerate(per_text):
        assert int(counts[i]) == len(a)
        torch.testing.assert_close(sums[i], a.sum(0), rtol=1e-5, atol=1e-5)
    got = diffmean_directions(sums, counts, [[0, 2]], [[1, 3, 4]])
    pos = torch.cat([per_text[0], per_text[2]]).mean(0)
    neg = torch.cat([per_text[j] for j in (1, 3, 4)]).mean(0)
    torch.testing.assert_close(got[0], (pos - neg) / (pos - neg).norm(), rtol=1e-5, atol=1e-6)
    norms = torch.cat([hook_activations(lm.model, HOOK, p)[1:].norm(dim=-1) for p in PROMPTS])
    assert residual_norm(lm.model, HOOK, PROMPTS, 1) == pytest.approx(float(norms.mean()), rel=1e-5)


def test_read_continuations_equal_one_row_at_a_time(lm, sae):
    """Rows sharing a prompt read it once (KV cache shared), rows with the same text once for every latent
    (the unsteered text judged against each concept): the same numbers as each row's own forward."""
    conts = [[8, 1, 2], [9], [3, 3, 7, 1], [2, 2], [6, 1, 9, 9, 4]]
    rows = [Row(0, "sae", 3, 1.0, PROMPTS[j % 2], c) for j, c in enumerate(conts)]
    rows += [Row(1, "none", None, None, PROMPTS[2], [5, 5, 1]), Row(1, "none", None, None, PROMPTS[0], [])]
    rows += [Row(0, "none", lat, None, PROMPTS[0], [8, 1, 2]) for lat in (0, 5, 11)]  # rows[0]'s text, 3 latents
    rows += [Row(0, "none", 7, None, PROMPTS[1], [8, 1, 2])]  # the same continuation after another prompt
    # prompting's rows: each alone behind its own prompt, read whole in batches of such texts
    rows += [Row(2, "prompt", 3, None, PROMPTS[2] + [4] * j, [7, 2, 9][: j + 1]) for j in range(3)]
    got = read_continuations(lm.model, sae, rows, max_tokens=8)  # 1-2 rows a batch
    wide = read_continuations(lm.model, sae, rows, max_tokens=64)  # several texts a batch
    np.testing.assert_allclose(np.array(wide), np.array(got), rtol=1e-5, atol=1e-6)
    for r, (loss, act) in zip(rows, got):
        if not r.continuation:
            assert math.isnan(loss) and act == 0.0
            continue
        tokens = torch.tensor([r.tokens + r.continuation])
        with torch.inference_mode():
            lp = lm.model(tokens)[0].float().log_softmax(-1)
            n = len(r.tokens)
            ref = -np.mean([float(lp[n - 1 + j, t]) for j, t in enumerate(r.continuation)])
            x = hook_activations(lm.model, HOOK, r.tokens + r.continuation)[n:]
            dense = sae(x, dense=True)
            codes = torch.zeros(len(x), 48).scatter(1, dense.indices, dense.values)
        assert loss == pytest.approx(ref, rel=1e-5)
        assert act == (pytest.approx(float(codes[:, r.latent].mean()), abs=1e-5) if r.latent is not None else 0.0)


def test_offline_judge_counts_mentions_and_loops_and_follows_its_thresholds():
    import pipeline.steering.judge as judge

    class FakeEncoder:
        """Known words and texts -> fixed unit vectors; anything else -> a vector of its own."""

        table = {"dog": [1, 0, 0], "puppy": [0.8, 0.6, 0], "cat": [0.5, 0.866, 0], "walk": [0, 0, 1]}

        def encode(self, texts):
            out = []
            for t in texts:
                v = self.table.get(t, [0, 1, 0] if "park" in t else [0.1, 0.1, 0.99])
                out.append(torch.tensor(v, dtype=torch.float))
            return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    items = [
        JudgeItem("dog", "walk", "Dogs and a puppy and a cat in the park.", 1.0),
        JudgeItem("dog", "walk", "", math.nan),
    ]
    f = OfflineJudge(FakeEncoder(), judge.Thresholds(word_similarity=0.7)).features(items)
    # "dogs" starts with the stem, "puppy" is close (0.8 >= 0.7), "cat" is not (0.5), "park" is not a word of it
    assert f[0]["exact_mentions"] == 1 and f[0]["mentions"] == 2
    assert f[0]["similarity"] == pytest.approx(0.0, abs=1e-6)  # the text (park) against "dog"
    assert rate(f[1]) == {"concept": 0, "instruction": 0, "fluency": 0, "harmonic": 0.0}
    # loops: the share of words inside a repeated word trigram, against brute force
    text = "a Roman Emperor, a Roman Emperor, a Roman Emperor is here"
    words = ["a", "roman", "emperor"] * 3 + ["is", "here"]
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    inside = {j for i, g in enumerate(grams) if grams.count(g) > 1 for j in range(i, i + 3)}
    assert loop_share(text) == pytest.approx(len(inside) / len(words)) and loop_share("one two three") == 0
    # each score's rule at its thresholds
    t = judge.Thresholds(0.6, (1, 3), (0.3, 0.6), (0.2, 0.4), 0.1, (2.0, 4.0), (0.3, 0.6))
    base = {"exact_mentions": 0, "word_similarities": [], "similarity": 0.0, "instruction_similarity": 0.5}
    base |= {"instruction_added_similarity": 0.5, "loss": 1.0, "loop": 0.0, "empty": False}
    concept = [
        rate(base | {"exact_mentions": m, "similarity": s}, t)["concept"]
        for m, s in ((0, 0.29), (1, 0), (3, 0), (0, 0.6))
    ]
    assert concept == [0, 1, 2, 2]
    assert [rate(base | {"instruction_similarity": x}, t)["instruction"] for x in (0.1, 0.2, 0.4)] == [0, 1, 2]
    # the same words, nothing added about them: capped at what it adds + the offset
    assert [rate(base | {"instruction_added_similarity": x}, t)["instruction"] for x in (0.0, 0.15, 0.3)] == [0, 1, 2]
    assert without_words(
        "A walk in the park is a classic urban fantasy film.", "Tell me about a walk in the park."
    ) == ("A in the is a classic urban fantasy film .")
    # a concept word's near neighbours count as mentions from the word-similarity threshold on
    near = base | {"exact_mentions": 0, "word_similarities": [0.59, 0.61, 0.9]}
    assert rate(near, t)["concept"] == 1 and rate(near, judge.Thresholds(0.55, (1, 3), (0.3, 0.6)))["concept"] == 2
    fluency = [
        rate(base | {"loss": x, "loop": y}, t)["fluency"] for x, y in ((1, 0), (2, 0), (4, 0), (1, 0.3), (1, 0.6))
    ]
    assert fluency == [2, 1, 0, 1, 0]
    assert rate(base | {"loss": math.nan}, t)["fluency"] == 2  # not read: the loops alone decide
    assert harmonic_mean(2, 2, 2) == 2 and harmonic_mean(1, 2, 0) == 0
    assert harmonic_mean(1, 2, 2) == pytest.approx(3 / (1 + 0.5 + 0.5))


def test_best_factor_is_never_one_that_left_the_text_unchanged():
    plain = {0: "plain a", 1: "plain b"}

    def rows(factor, texts, harmonic, concept=0):
        return [
            Row(p, "sae", 1, factor, text=t, scores={"harmonic": harmonic, "concept": concept})
            for p, t in enumerate(texts)
        ]

    # all harmonic 0: the tie does not fall back to the smallest factor, which changed nothing
    sweep = rows(0.1, ["plain a", "plain b"], 0) + rows(0.2, ["x", "plain b"], 0) + rows(0.4, ["x", "y"], 0)
    assert best_factor(sweep, plain, [0.1, 0.2, 0.4]) == 0.4
    sweep += rows(0.8, ["z", "w"], 0, concept=1)  # changed too, and more on-concept
    assert best_factor(sweep, plain, [0.1, 0.2, 0.4, 0.8]) == 0.8
    sweep += rows(1.6, ["u", "v"], 1.0)
    assert best_factor(sweep, plain, [0.1, 0.2, 0.4, 0.8, 1.6]) == 1.6
    same = rows(0.1, ["plain a", "plain b"], 1.0) + rows(0.2, ["plain a", "plain b"], 0)
    assert best_factor(same, plain, [0.1, 0.2]) == 0.2  # nothing changes the text: the strongest push


def top_sentences(tiny, root, out, **kw) -> None:
    """Top sentences of the demo SAE (root/sae) over root/s, read from the capture root/acts."""
    from capture_top_activating_sentences import main as top_main
    from pipeline.top_sentences.config import TopSentencesConfig

    top_main(
        TopSentencesConfig(
            sae=str(root / "sae"),
            sentences=str(root / "s"),
            out=str(out),
            model=str(tiny.hf_dir),
            capture=str(root / "acts"),
            device="cpu",
            model_dtype="float32",
            max_sentences=0,
            **kw,
        )
    )


@pytest.fixture(scope="module")
def demo_inputs(tiny, tmp_path_factory, lm):
    """A tiny SAE with its top sentences and meanings, as the earlier stages leave them."""
    from capture_activations import main as capture_main
    from openwebtext_sentences_dataset import main as sentences_main
    from pipeline.capture.config import CaptureConfig
    from pipeline.interpret.explainers import LatentExamples
    from pipeline.sae.formats import sae_sha256
    from pipeline.sentences.config import SentencesConfig
    from pipeline.top_sentences.tables import open_top_sentences

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(2)
    sae = TopKSae(SaeConfig(d_model=lm.args.dim, n_latents=48, k=4, hook_point=HOOK, model=lm.identity()))
    sae.save(root / "sae")
    sentences_main(
        SentencesConfig(out=str(root / "s"), max_documents=20, splitter="trained", punkt_train_chars=100_000)
    )
    # a capture in small fp32 shards (sentences straddle them); top sentences reads it, DiffMean then too
    capture_main(
        CaptureConfig(
            sentences=str(root / "s"),
            out=str(root / "acts"),
            model=str(tiny.hf_dir),
            hook_points=[HOOK],
            device="cpu",
            model_dtype="float32",
            storage_dtype="float32",
            shard_tokens=40,
        )
    )
    top_sentences(tiny, root, root / "top", top_n=6)
    firing = sorted(LatentExamples.load(open_top_sentences(root / "top"), "max").top)[:5]
    (root / "m").mkdir()
    doc = {
        "sae_sha256": sae_sha256(root / "sae"),
        "explainer": "test",
        "latents": [  # two meanings name words (concept tokens), three only word pieces (none)
            {"latent": i, "meaning": meaning, "certainty": 0.5, "score": None}
            for i, meaning in zip(
                firing, ['the tokens "capital", "berlin"', 'the tokens "moon", "germany"'] + ['the token "w"'] * 3
            )
        ],
    }
    (root / "m" / "test.json").write_text(json.dumps(doc))
    return root, firing


def test_the_stage_ranks_sweeps_and_reports_reproducibly(tiny, demo_inputs, tmp_path, capsys):
    from llama_3.generation import Generator
    from pipeline.steering.config import SteeringEvalConfig
    from steering_evaluation import main as eval_main

    root, firing = demo_inputs
    cfg = SteeringEvalConfig(
        sae=str(root / "sae"),
        top_sentences=str(root / "top"),
        meanings=str(root / "m"),
        out=str(tmp_path / "eval"),
        model=str(tiny.hf_dir),
        n_candidates=3,
        factors=[0.5, 3.0],
        select_instructions=["a b c", "d e"],
        test_instructions=["f g h i", "j k"],
        max_new_tokens=4,
        device="cpu",
        dtype="float32",
    )
    doc = eval_main(cfg)
    assert doc["diffmean_activations"] == str(root / "acts")  # where top sentences read them
    rows = doc["rows"]
    scores = {int(k): v for k, v in doc["output_scores"].items()}
    promoted = {int(k): v for k, v in doc["promoted_scores"].items()}
    assert sorted(promoted) == firing  # every latent with a meaning that fires
    assert sorted(scores) == firing[:2]  # those whose meaning names concept words ("w" does not)
    # those first, by output score; then (too few of them) the best of the rest by their promoted tokens
    best = sorted(scores, key=lambda lat: (-scores[lat], lat))
    best += sorted(firing[2:], key=lambda lat: -promoted[lat])[:1]
    assert [r["latent"] for r in doc["latents"]] == best
    concepts = [r["concept"] for r in doc["latents"]]
    # each the first concept word, and the second only where MiniLM finds it related (related_words)
    assert {c.split(",")[0] for c in concepts[:2]} == {"capital", "moon"}
    assert concepts[2] == 'the token "w"'  # no concept words: the meaning itself
    # every row kept: per latent, each instruction unsteered, the sweep (2 methods x 2 factors x 2 select
    # instructions) and the test (2 steered methods and prompting x 2 test instructions)
    assert len(rows) == 3 * (4 + 2 * 2 * 2 + 3 * 2)
    for lat in best:
        mine = [r for r in rows if r["latent"] == lat]
        assert sorted((r["method"], r["phase"]) for r in mine if r["method"] in ("none", "prompt")) == sorted(
            [("none", "select")] * 2 + [("none", "test")] * 2 + [("prompt", "test")] * 2
        )
        for m in ("sae", "diffmean"):
            cell = next(r["methods"][m] for r in doc["latents"] if r["latent"] == lat)
            sweep = [
                Row(r["prompt"], m, lat, r["factor"], text=r["text"], scores=r)
                for r in mine
                if r["method"] == m and r["phase"] == "select"
            ]
            plain = {r["prompt"]: r["text"] for r in mine if r["method"] == "none"}
            assert cell["best_factor"] == best_factor(sweep, plain, cfg.factors)
            assert cell["strength"] == pytest.approx(cell["best_factor"] * doc["residual_norm"], rel=1e-3)
            test = [r for r in mine if r["method"] == m and r["phase"] == "test"]
            assert {r["factor"] for r in test} == {cell["best_factor"]} and len(test) == 2
        plain = {r["prompt"]: r["text"] for r in mine if r["method"] == "none"}
        assert all(r["changed"] == (r["text"] != plain[r["prompt"]]) for r in mine if r["method"] != "none")
    for m in ("sae", "diffmean", "prompt"):  # the summary is over the held-out rows
        test = [r for r in rows if r["method"] == m and r["phase"] == "test"]
        summary = doc["summary"][m]
        assert summary["rows"] == 6 and summary["harmonic"] == pytest.approx(
            np.mean([r["harmonic"] for r in test]), abs=1e-4
        )
        assert summary["on_concept"] == pytest.approx(np.mean([r["concept"] == 2 for r in test]), abs=1e-4)
        assert summary["concept_any"] == pytest.approx(np.mean([r["concept"] >= 1 for r in test]), abs=1e-4)
        low, high = summary["on_concept_ci"]
        assert low <= summary["on_concept"] <= high
    # the typed reader gives the same rows, and each latent's held-out table puts every method beside unsteered
    from pipeline.steering.results import SteeringEvalOutput

    done = SteeringEvalOutput.open(cfg.out)
    assert [(r.method, r.text, r.concept) for r in done.rows] == [(r["method"], r["text"], r["concept"]) for r in rows]
    table = done.side_by_side(best[0])
    assert [t["instruction"] for t in table] == ["f g h i", "j k"]
    assert all(set(t) == {"instruction", "none", "sae", "diffmean", "prompt"} for t in table)
    # the hint steers the best SAE latent at its recommended add strength (SAE units, from the sweep)
    hint = re.search(r"--steer (\d+):add:(\S+) --inspect 5 --chat 'f g h i' --temperature 0", capsys.readouterr().out)
    by_latent = {r["latent"]: r["methods"]["sae"] for r in doc["latents"]}
    assert by_latent[int(hint[1])]["test"]["harmonic"] == max(c["test"]["harmonic"] for c in by_latent.values())
    assert float(hint[2]) == pytest.approx(by_latent[int(hint[1])]["add_strength"], rel=1e-2)
    # ... and the terminal CLI's `add` at that strength on that instruction gives the evaluation's row
    from pipeline.steering.session import Session
    from pipeline.steering.splice import SteeringEntry

    session = Session.open(cfg.model, cfg.sae, cfg.meanings, "cpu", "float32")
    prompt = session.loaded.chat_format.encode_dialog([{"role": "user", "content": "f g h i"}])
    entry = SteeringEntry(int(hint[1]), "add", float(hint[2]))  # as printed
    [(_, steered)] = session.complete([prompt], [entry], max_new_tokens=4, temperature=0)
    assert steered.text == next(
        r["text"]
        for r in rows
        if r["latent"] == int(hint[1]) and r["method"] == "sae" and r["phase"] == "test" and r["prompt"] == 2
    )
    # the unsteered rows rode in the steered batches with a zero vector: exactly the clean model
    lm = load_model(tiny.hf_dir)
    assert lm.chat_format is not None  # instructions go through the chat template
    dialogs = [[{"role": "user", "content": t}] for t in ("a b c", "d e", "f g h i", "j k")]
    clean = Generator(lm).chat_completion(dialogs, max_new_tokens=4, temperature=0)
    unsteered = [r for r in rows if r["method"] == "none" and r["latent"] == best[0]]
    assert [r["text"] for r in sorted(unsteered, key=lambda r: r["prompt"])] == [c.text for c in clean]
    one_by_one = eval_main(SteeringEvalConfig(**{**cfg.__dict__, "batch_rows": 1, "force": True}))
    assert one_by_one == doc
    capsys.readouterr()
    assert eval_main(cfg) == json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "already complete" in capsys.readouterr().out
    with pytest.MonkeyPatch.context() as mp:  # new code that evaluates differently: not the old results
        mp.setattr(steering_stage, "METHOD_VERSION", steering_stage.METHOD_VERSION + 1)
        assert (
            steering_stage.request_fingerprint(cfg)
            != json.loads((tmp_path / "eval" / "manifest.json").read_text())["fingerprint"]
        )
    import shutil

    shutil.copytree(root / "top", tmp_path / "top2")
    other = SteeringEvalConfig(**{**cfg.__dict__, "top_sentences": str(tmp_path / "top2"), "out": str(tmp_path / "e2")})
    eval_main(other)
    # the same SAE's top sentences remade in place with another top_n: the same path, new examples
    top_sentences(tiny, root, tmp_path / "top2", top_n=4, force=True)
    capsys.readouterr()
    eval_main(other)
    assert "already complete" not in capsys.readouterr().out  # evaluated again
    with pytest.raises(PipelineInputError, match="--latents"):
        eval_main(SteeringEvalConfig(**{**cfg.__dict__, "latents": [47, 46, 45, 44, 43, 42], "force": True}))
    with pytest.raises(PipelineInputError, match="--factors"):
        eval_main(SteeringEvalConfig(**{**cfg.__dict__, "factors": [0.0], "force": True}))


def eval_config(tiny, root, out, **kw):
    """A steering evaluation of the demo inputs on CPU (one select instruction unless given)."""
    from pipeline.steering.config import SteeringEvalConfig

    base = dict(sae=str(root / "sae"), top_sentences=str(root / "top"), meanings=str(root / "m"), out=str(out))
    base |= dict(model=str(tiny.hf_dir), select_instructions=["a b c"], device="cpu", dtype="float32")
    return SteeringEvalConfig(**(base | kw))


@pytest.mark.parametrize("mode,keep_error", [("clamp", True), ("add", False)])
def test_sae_rows_through_the_sae_splice_equal_the_terminal_cli(tiny, demo_inputs, tmp_path, mode, keep_error):
    """--sae-mode clamp / --no-keep-error: each SAE row is what the CLI's entry at the same push generates."""
    from pipeline.steering.session import Session
    from steering_evaluation import main as eval_main

    root, _ = demo_inputs
    cfg = eval_config(
        tiny,
        root,
        tmp_path / "eval",
        n_candidates=1,
        factors=[2.0],
        test_instructions=["f g h i"],
        max_new_tokens=4,
        sae_mode=mode,
        keep_error=keep_error,
    )
    doc = eval_main(cfg)
    [entry] = doc["latents"]
    [row] = [r for r in doc["rows"] if r["method"] == "sae" and r["phase"] == "test"]
    session = Session.open(cfg.model, cfg.sae, cfg.meanings, "cpu", "float32")
    prompt = session.loaded.chat_format.encode_dialog([{"role": "user", "content": "f g h i"}])
    steer = SteeringEntry(entry["latent"], mode, entry["methods"]["sae"]["add_strength"])
    [(_, steered)] = session.complete([prompt], [steer], max_new_tokens=4, temperature=0, keep_error=keep_error)
    assert row["text"] == steered.text


def test_capture_sums_equal_the_model_on_sentences_that_straddle_shards(demo_inputs, tiny, lm):
    from pipeline.capture.activations import CaptureOutput
    from pipeline.sentences.dataset import iter_sentences

    root, _ = demo_inputs
    capture = CaptureOutput.open(root / "acts")
    assert len(capture.shard_paths) > 5  # 40-token shards: many sentences are cut in two or three
    texts = {}
    for part in iter_sentences(root / "s"):
        texts.update(zip(part["sentence_id"], part["text"]))
    ids = sorted(texts)[::3]
    tokenization = Tokenization(add_bos=False, max_tokens=192, exclude_first_positions=1)
    got_sums, got_counts = capture_sums(capture, HOOK, ids, 1)
    sums, counts = hook_sums(lm.model, HOOK, tokenization, lm.tokenizer, [texts[i] for i in ids])
    assert got_counts.tolist() == counts.tolist()
    torch.testing.assert_close(got_sums, sums, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="holds no sentence"):
        capture_sums(capture, HOOK, [10**6], 1)


def test_the_claude_judge_rates_every_held_out_continuation_through_batches(tiny, demo_inputs, tmp_path, monkeypatch):
    """--judge claude against a local Message Batches server (the real SDK): every held-out row and the
    unsteered rows per latent are rated with the rubric, scores land per method; a re-run after a kill
    (results.json gone, the batch state kept) sends nothing again."""
    from fake_batches_server import FakeBatches

    from pipeline.steering.config import SteeringEvalConfig
    from steering_evaluation import main as eval_main

    seen = []

    def answer(cid, params):
        prompt = params["messages"][0]["content"]
        seen.append(prompt)
        assert re.search(r"Concept: (capital|moon)(, \w+)?\n", prompt) and "Instruction:" in prompt
        return "succeeded", 'Scores: {"concept": 2, "instruction": 2, "fluency": 1}'

    root, _ = demo_inputs
    server = FakeBatches(answer, polls_until_end=1)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-key")
    try:
        cfg = eval_config(
            tiny,
            root,
            tmp_path / "eval",
            n_candidates=2,
            factors=[1.0],
            test_instructions=["f g h i", "j k"],
            max_new_tokens=3,
            judge="claude",
            base_url=server.url,
            poll_seconds=0.01,
        )
        doc = eval_main(cfg)
        n_rows = 2 * 2 * 3 + 2 * 2  # latents x test prompts x methods, and the unsteered rows per latent
        sent = [r for b in server.batches.values() for r in b["requests"]]
        assert len(sent) == n_rows and server.create_attempts == 1 and seen
        for m in ("sae", "diffmean", "prompt"):
            claude = doc["summary"][m]["claude"]
            assert claude["rated"] == 4 and claude["harmonic"] == pytest.approx(1.5) and claude["on_concept"] == 1.0
        assert doc["summary"]["unsteered"]["claude"]["on_concept"] == 1.0
        held_out = [r for r in doc["rows"] if r["phase"] == "test"]
        assert len(held_out) == n_rows and all(r["claude"]["concept"] == 2 for r in held_out)
        offline = np.mean([r["concept"] == 2 for r in held_out])  # Claude says 2 everywhere
        assert doc["summary"]["claude_offline_agreement"] == pytest.approx(offline, abs=1e-3)
        (tmp_path / "eval" / "results.json").unlink()  # killed after the batches were sent
        again = eval_main(cfg)
        assert server.create_attempts == 1 and len(server.batches) == 1  # adopted, not sent again
        assert again == doc
    finally:
        server.close()
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(PipelineInputError, match="ANTHROPIC_API_KEY"):
        eval_main(SteeringEvalConfig(**{**cfg.__dict__, "force": True}))


def test_promoted_tokens_never_holds_the_whole_lens(lm, sae):
    """At the users' size the [n_latents, vocab] lens is 25 GB: it is computed in row chunks, and equals the
    brute-force product's top tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):  # the lens products
                Largest.numel = max(Largest.numel, out.numel())
            return out

    dirs = sae_directions(sae, list(range(40)))
    vocab = lm.model.output.weight.shape[0]
    with torch.inference_mode(), Largest():
        got = promoted_tokens(lm.model, dirs, 3, chunk_rows=8)
    assert Largest.numel <= 8 * vocab
    lens = (dirs * lm.model.norm.weight.float()) @ lm.model.output.weight.float().t()  # [40, V], brute force
    assert torch.equal(got.sort(-1).values, lens.topk(3, dim=-1).indices.sort(-1).values)


def test_diffmean_reads_the_capture_only_when_it_is_the_saes(demo_inputs, lm):
    """A relative capture path read from another folder can lead to another run's capture (another hook point, or
    other data): DiffMean then runs the model instead of reading the wrong activations."""
    import dataclasses

    from pipeline.sae.formats import load_sae
    from pipeline.steering.stage import top_sentences_capture
    from pipeline.top_sentences.tables import open_top_sentences

    root, _ = demo_inputs
    top = open_top_sentences(root / "top")
    cfg = load_sae(root / "sae").cfg
    capture, n = top_sentences_capture(top, cfg)
    assert capture is not None and capture.directory == root / "acts" and n == top.capture_sentences
    assert top_sentences_capture(top, dataclasses.replace(cfg, hook_point="resid_pre.0")) == (None, 0)
    other = dataclasses.replace(cfg, trained_on=dataclasses.replace(cfg.trained_on, capture_fingerprint="f" * 64))
    assert top_sentences_capture(top, other) == (None, 0)


def test_results_of_an_older_evaluation_are_not_shown(tmp_path):
    """results.json without its rows (the evaluation before every row was kept): the reader refuses it with one
    line, and the browser and the page then show no steering rather than fail on missing numbers."""
    from pipeline.core.manifest import make_manifest, write_json_atomic
    from pipeline.steering.results import SteeringEvalOutput, open_for_sae

    write_json_atomic(tmp_path / "manifest.json", make_manifest("steering_eval", {}, {"sae_sha256": "ab"}, {}))
    (tmp_path / "results.json").write_text(json.dumps({"hook_point": "x", "summary": {}, "latents": []}))
    with pytest.raises(PipelineInputError, match="older steering evaluation"):
        SteeringEvalOutput.open(tmp_path)
    assert open_for_sae(tmp_path, "ab") is None
