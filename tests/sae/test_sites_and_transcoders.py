"""SAEs at every site (attn_out, mlp_out) and transcoders (ffn_norm -> mlp_out): trained from one capture,
checked against brute-force references that never use the hook machinery (the model's modules patched by hand),
plus Llama Scope's training variants (TopK by decoder norm, K-annealing)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from capture_activations import main as capture_main
from llama_3 import load_model
from llama_3.errors import PipelineInputError
from openwebtext_sentences_dataset import main as sentences_main
from pipeline.capture.config import CaptureConfig
from pipeline.core.distributed import DistInfo
from pipeline.preprocessing.config import PreprocessConfig
from pipeline.preprocessing.preprocessed import PreprocessedOutput
from pipeline.preprocessing.stage import preprocess
from pipeline.sae.config import TrainConfig
from pipeline.sae.model import SaeConfig, TopKSae
from pipeline.sae.splice_eval import splice_eval
from pipeline.sentences.config import SentencesConfig
from pipeline.sentences.dataset import iter_sentences
from sae_training import main as train

SITES = ["attn_out.1", "ffn_norm.1", "mlp_out.1"]
SINGLE = DistInfo(0, 1, 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def suite_data(tmp_path_factory, tiny):
    """One capture of three sites of block 1, each preprocessed with the same seed."""
    root = tmp_path_factory.mktemp("sites")
    sentences_main(
        SentencesConfig(out=str(root / "s"), max_documents=40, splitter="trained", punkt_train_chars=100_000)
    )
    capture_main(
        CaptureConfig(
            sentences=str(root / "s"),
            out=str(root / "acts"),
            model=str(tiny.hf_dir),
            device="cpu",
            model_dtype="float32",
            storage_dtype="float32",
            hook_points=SITES,
        )
    )
    for site in SITES:
        preprocess(
            PreprocessConfig(
                capture=str(root / "acts"), out=str(root / site), hook_point=site, batch_size=256, workers=1
            )
        )
    return root


def train_cfg(root: Path, data: str, out: str, **kw) -> TrainConfig:
    base = dict(
        data=str(root / data),
        out=str(root / out),
        wandb="disabled",
        device="cpu",
        batch_size=256,
        expansion=2,
        k=8,
        val_every=10**9,
        checkpoint_every=10**9,
        eval_sentences=24,
        autocast="off",
        force=True,
    )
    return TrainConfig(**{**base, **kw})


def held_out_texts(root: Path, data: str, n: int) -> list[str]:
    wanted = set(PreprocessedOutput.open(root / data).val_sentence_ids()[:n].tolist())
    return [t for part in iter_sentences(root / "s") for s, t in zip(part["sentence_id"], part["text"]) if s in wanted]


def patched_loss(lm, texts, tokenization, module, replace) -> float:
    """Mean next-token CE with `module`'s forward replaced by replace(module_input) at positions >= skip, one
    sentence at a time: the reference, built from the model's own modules, no hooks."""
    original = module.forward
    total, n = 0.0, 0

    def forward(h, *args, **kwargs):
        real = original(h, *args, **kwargs)
        new = replace(h, real)
        keep = (torch.arange(h.shape[1]) < tokenization.skip_first_positions)[None, :, None]
        return torch.where(keep, real, new)

    module.forward = forward
    try:
        with torch.no_grad():
            for t in tokenization.encode(lm.tokenizer, texts):
                if len(t) < 2:
                    continue
                ids = torch.tensor([t])
                logits = lm.model(ids)
                nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                total, n = total + float(nll), n + ids.shape[1] - 1
    finally:
        module.forward = original
    return total / n


def test_a_transcoder_trains_on_paired_sites_and_replaces_the_mlp(suite_data, tiny):
    root = suite_data
    done = train(train_cfg(root, "ffn_norm.1", "tc", target_data=str(root / "mlp_out.1")))
    sae = TopKSae.load(root / "tc" / "sae")
    assert (sae.cfg.hook_point, sae.cfg.output_hook_point, sae.cfg.site_hook_point) == (
        "ffn_norm.1",
        "mlp_out.1",
        "mlp_out.1",
    )
    # FVU against the target, by brute force on the validation rows (numpy, dense)
    x = PreprocessedOutput.open(root / "ffn_norm.1").activations("val").float()
    target = PreprocessedOutput.open(root / "mlp_out.1")
    y = target.activations("val").float().numpy().astype(np.float64)
    mean = np.array(target.stats["mean"])  # the FVU's variance is about the training tokens' mean
    with torch.no_grad():
        y_hat = sae(x, dense=True).x_hat.numpy().astype(np.float64)
    fvu = ((y_hat - y) ** 2).sum() / ((y - mean) ** 2).sum()
    assert done["final_validation"]["val/fvu"] == pytest.approx(fvu, rel=1e-3)
    assert fvu < 0.9  # it learned the MLP's map, not just its mean
    # the spliced CE: the model with block 1's MLP module replaced by the transcoder on the same sentences
    lm = load_model(tiny.hf_dir)
    texts = held_out_texts(root, "ffn_norm.1", 24)
    spliced = splice_eval(lm, sae.reconstruct, texts, "mlp_out.1", sae.cfg.tokenization, source="ffn_norm.1")
    ref = patched_loss(lm, texts, sae.cfg.tokenization, lm.model.layers[1].feed_forward, lambda h, _: sae(h).x_hat)
    assert spliced["eval/ce_sae"] == pytest.approx(ref, rel=1e-4)
    assert done["spliced_evaluation"]["eval/ce_sae"] == pytest.approx(ref, rel=1e-4)
    assert spliced["eval/ce_sae"] > spliced["eval/ce_clean"] + 1e-4  # a lossy MLP: the check has teeth


def test_an_attention_output_sae_splices_where_the_attention_adds(suite_data, tiny):
    root = suite_data
    done = train(train_cfg(root, "attn_out.1", "attn"))
    sae = TopKSae.load(root / "attn" / "sae")
    lm = load_model(tiny.hf_dir)
    texts = held_out_texts(root, "attn_out.1", 24)
    ref = patched_loss(lm, texts, sae.cfg.tokenization, lm.model.layers[1].attention, lambda _, a: sae(a).x_hat)
    assert done["spliced_evaluation"]["eval/ce_sae"] == pytest.approx(ref, rel=1e-4)
    assert 0 < done["spliced_evaluation"]["eval/ce_loss_recovered"] <= 1.0


def test_a_skip_transcoder_starts_as_the_plain_one_and_learns_its_skip(suite_data):
    root = suite_data
    done = train(
        train_cfg(root, "ffn_norm.1", "skip", target_data=str(root / "mlp_out.1"), skip=True),
    )
    plain = json.loads((root / "tc" / "manifest.json").read_text()) if (root / "tc").exists() else None
    sae = TopKSae.load(root / "skip" / "sae")
    assert sae.cfg.skip and float(sae.W_skip.abs().max()) > 0
    if plain is not None:  # the skip connection adds a linear map: it fits at least as well here
        assert done["final_validation"]["val/fvu"] <= plain["final_validation"]["val/fvu"] + 0.02


def test_a_target_that_does_not_pair_is_refused(suite_data, tmp_path):
    root = suite_data
    preprocess(
        PreprocessConfig(
            capture=str(root / "acts"), out=str(tmp_path / "other"), hook_point="mlp_out.1", batch_size=256, seed=1
        )
    )
    with pytest.raises(PipelineInputError, match="train rows are not --data's"):
        train(train_cfg(root, "ffn_norm.1", "bad", target_data=str(tmp_path / "other")))
    with pytest.raises(PipelineInputError, match="not another hook point"):
        train(train_cfg(root, "ffn_norm.1", "bad", target_data=str(root / "ffn_norm.1")))
    with pytest.raises(PipelineInputError, match="--skip"):
        train(train_cfg(root, "ffn_norm.1", "bad", skip=True))


def test_topk_by_decoder_norm_ranks_by_contribution():
    """The k latents with the largest pre-activation x decoder norm, values the plain pre-activations."""
    torch.manual_seed(0)
    sae = TopKSae(SaeConfig(d_model=16, n_latents=64, k=5, topk_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) * 3)
        sae.b_enc.normal_()
    x = torch.randn(20, 16)
    out = sae(x)
    pre = (x - sae.b_pre) @ sae.W_enc.t() + sae.b_enc
    norms = sae.W_dec.norm(dim=1)
    for row in range(20):
        want = set((pre[row] * norms).topk(5).indices.tolist())
        assert set(out.indices[row].tolist()) == want
        torch.testing.assert_close(out.values[row], pre[row, out.indices[row]].relu(), rtol=1e-4, atol=1e-5)
    dense = sae(x, dense=True)
    torch.testing.assert_close(dense.x_hat, out.x_hat, rtol=1e-4, atol=1e-4)
    sae.normalize_decoder()  # free norms stay free
    torch.testing.assert_close(sae.W_dec.norm(dim=1), norms)


def test_k_annealing_schedule(suite_data):
    from pipeline.sae.training import Trainer

    t = Trainer(train_cfg(suite_data, "attn_out.1", "anneal", k=8, k_start=32, k_anneal_steps=4), SINGLE)
    assert [t.k_at(s) for s in range(6)] == [32, 26, 20, 14, 8, 8]
    with pytest.raises(PipelineInputError, match="--k-start 4"):
        Trainer(train_cfg(suite_data, "attn_out.1", "anneal", k=8, k_start=4, k_anneal_steps=4), SINGLE)


def test_a_suite_in_one_pass_equals_its_runs_one_by_one(suite_data, tmp_path):
    """Three SAEs (two sites, two widths) and a transcoder from one read of each batch: every weight equals its
    own run's, bit for bit, and each run folder holds the usual manifest."""
    root = suite_data
    entries = [
        {"data": str(root / "attn_out.1"), "out": str(tmp_path / "suite" / "A-2x")},
        {"data": str(root / "attn_out.1"), "out": str(tmp_path / "suite" / "A-4x"), "expansion": 4, "k": 4},
        {"data": str(root / "mlp_out.1"), "out": str(tmp_path / "suite" / "M-2x")},
        {
            "data": str(root / "ffn_norm.1"),
            "target_data": str(root / "mlp_out.1"),
            "out": str(tmp_path / "suite" / "TC"),
        },
    ]
    (tmp_path / "suite.json").write_text(json.dumps(entries))
    done = train(train_cfg(root, "attn_out.1", "unused", suite=str(tmp_path / "suite.json"), eval_sentences=0))
    assert len(done["suite"]) == 4
    for entry in entries:
        alone = tmp_path / "alone" / Path(entry["out"]).name
        flags = {k: v for k, v in entry.items() if k not in ("data", "out")}
        train(
            replace(
                train_cfg(root, "attn_out.1", "unused", eval_sentences=0, **flags), data=entry["data"], out=str(alone)
            )
        )
        ours = TopKSae.load(Path(entry["out"]) / "sae").state_dict()
        theirs = TopKSae.load(alone / "sae").state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (entry["out"], name)
    again = train(
        train_cfg(root, "attn_out.1", "unused", suite=str(tmp_path / "suite.json"), eval_sentences=0, force=False)
    )
    assert [m["fingerprint"] for m in again["suite"]] == [m["fingerprint"] for m in done["suite"]]  # reused


def test_a_suite_that_cannot_share_one_pass_is_refused(suite_data, tmp_path):
    root = suite_data
    bad = {
        "two batch sizes": [
            {"data": str(root / "attn_out.1"), "out": str(tmp_path / "a")},
            {"data": str(root / "mlp_out.1"), "out": str(tmp_path / "b"), "batch_size": 128},
        ],
        "unknown flags": [{"data": str(root / "attn_out.1"), "out": str(tmp_path / "a"), "widht": 3}],
        "same out folder": [
            {"data": str(root / "attn_out.1"), "out": str(tmp_path / "a")},
            {"data": str(root / "mlp_out.1"), "out": str(tmp_path / "a")},
        ],
    }
    messages = {"two batch sizes": "same batch_size", "unknown flags": "unknown flags", "same out folder": "same out"}
    for name, entries in bad.items():
        (tmp_path / "suite.json").write_text(json.dumps(entries))
        with pytest.raises(PipelineInputError, match=messages[name]):
            train(train_cfg(root, "attn_out.1", "unused", suite=str(tmp_path / "suite.json")))
        assert not (tmp_path / "a").exists() or name != "two batch sizes"


def test_long_context_profile_against_per_position_brute_force(tiny):
    """Per position bucket: FVU and delta loss of a transcoder on sequences longer than its training context,
    recomputed position by position with the model's MLP module patched by hand."""
    from pipeline.sae.suite_eval import long_context_profiles

    lm = load_model(tiny.hf_dir)
    torch.manual_seed(3)
    d = lm.args.dim
    cfg = SaeConfig(
        d_model=d,
        n_latents=4 * d,
        k=8,
        hook_point="ffn_norm.1",
        output_hook_point="mlp_out.1",
        output_scale=2.0,
        input_scale=0.5,
        exclude_first_positions=1,
        max_tokens=16,
    )
    sae = TopKSae(cfg)
    sequences = [
        torch.randint(0, lm.args.vocab_size, (40,), generator=torch.Generator().manual_seed(i)).tolist()
        for i in range(3)
    ]
    got, _ = long_context_profiles(
        lm, [sae, TopKSae(replace(cfg, hook_point="attn_out.0", output_hook_point=""))], sequences, [0, 16, 40], batch=2
    )
    with torch.no_grad():
        tokens = torch.tensor(sequences)
        acts = lm.model.capture(tokens, ["ffn_norm.1", "mlp_out.1"])
        y = acts["mlp_out.1"].double()
        err = (sae(acts["ffn_norm.1"].reshape(-1, d)).x_hat.reshape(y.shape).double() - y).pow(2).sum(-1)
        mean = y[:, 1:].reshape(-1, d).mean(0)
        dev = (y - mean).pow(2).sum(-1)
        clean = torch.nn.functional.cross_entropy(
            lm.model(tokens)[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none"
        )
    spliced = patched_loss_per_token(lm, tokens, lm.model.layers[1].feed_forward, lambda h: sae(h).x_hat, skip=1)
    first, second = got["buckets"]
    assert first["positions"] == [1, 16] and second["positions"] == [16, 39]
    assert first["fvu"] == pytest.approx(float(err[:, 1:16].sum() / dev[:, 1:16].sum()), rel=1e-4)
    assert second["fvu"] == pytest.approx(float(err[:, 16:39].sum() / dev[:, 16:39].sum()), rel=1e-4)
    assert second["delta_lm_loss"] == pytest.approx(float((spliced - clean)[:, 16:39].mean()), rel=1e-3, abs=1e-5)


def patched_loss_per_token(lm, tokens, module, replace_fn, skip: int) -> torch.Tensor:
    original = module.forward

    def forward(h):
        real = original(h)
        keep = (torch.arange(h.shape[1]) < skip)[None, :, None]
        return torch.where(keep, real, replace_fn(h))

    module.forward = forward
    try:
        with torch.no_grad():
            logits = lm.model(tokens)
    finally:
        module.forward = original
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def test_feature_splitting_matches_the_brute_force_nearest_decoder():
    from pipeline.sae.suite_eval import feature_splitting

    torch.manual_seed(0)
    narrow = TopKSae(SaeConfig(d_model=16, n_latents=32, k=4))
    wide = TopKSae(SaeConfig(d_model=16, n_latents=128, k=4))
    with torch.no_grad():  # wide latents 0..2 are noisy copies of narrow latent 5
        wide.W_dec[:3] = narrow.W_dec[5] + 0.1 * torch.randn(3, 16)
    got = feature_splitting(narrow, wide, chunk=50)
    cos = torch.nn.functional.normalize(wide.W_dec, dim=1) @ torch.nn.functional.normalize(narrow.W_dec, dim=1).t()
    assert torch.equal(got.parent, cos.argmax(1))
    torch.testing.assert_close(got.cosine, cos.max(1).values)
    assert got.children(0.9)[5][:3] == [0, 1, 2] and next(iter(got.children(0.9))) == 5


def test_many_saes_spliced_together_equal_the_hand_patched_model(suite_data, tiny):
    """splice_eval_many (one clean forward, each SAE resumed at its layer) against the model with the attention
    or MLP module replaced by hand, one SAE at a time."""
    from pipeline.sae.splice_eval import SpliceTarget, splice_eval_many

    lm = load_model(tiny.hf_dir)
    d = lm.args.dim
    torch.manual_seed(7)
    attn0 = TopKSae(SaeConfig(d_model=d, n_latents=2 * d, k=4, hook_point="attn_out.0", exclude_first_positions=1))
    attn1 = TopKSae(SaeConfig(d_model=d, n_latents=2 * d, k=4, hook_point="attn_out.1", exclude_first_positions=1))
    tc = TopKSae(
        SaeConfig(
            d_model=d,
            n_latents=2 * d,
            k=4,
            hook_point="ffn_norm.1",
            output_hook_point="mlp_out.1",
            exclude_first_positions=1,
        )
    )
    texts = held_out_texts(suite_data, "attn_out.1", 12)
    tokenization = attn0.cfg.tokenization
    got = splice_eval_many(
        lm,
        [
            SpliceTarget(attn0.reconstruct, "attn_out.0"),
            SpliceTarget(attn1.reconstruct, "attn_out.1"),
            SpliceTarget(tc.reconstruct, "mlp_out.1", "ffn_norm.1"),
        ],
        texts,
        tokenization,
        max_batch_tokens=300,
    )
    refs = [
        patched_loss(lm, texts, tokenization, lm.model.layers[0].attention, lambda _, a: attn0(a).x_hat),
        patched_loss(lm, texts, tokenization, lm.model.layers[1].attention, lambda _, a: attn1(a).x_hat),
        patched_loss(lm, texts, tokenization, lm.model.layers[1].feed_forward, lambda h, _: tc(h).x_hat),
    ]
    zero_attn1 = patched_loss(lm, texts, tokenization, lm.model.layers[1].attention, lambda _, a: torch.zeros_like(a))
    for result, ref in zip(got, refs):
        assert result["eval/ce_sae"] == pytest.approx(ref, rel=1e-4)
    assert got[1]["eval/ce_zero_ablation"] == pytest.approx(zero_attn1, rel=1e-4)
    assert len({round(r["eval/ce_sae"], 4) for r in got}) == 3  # three different splices: the check has teeth


@pytest.mark.parametrize("site", ["attn_out.1", "transcoder", "skip transcoder"])
def test_steering_adds_the_decoder_row_where_the_sae_writes(tiny, site):
    """`add` steering with the error term kept: the model sees its own activation at the SAE's output site plus
    strength x the latent's decoder row (in raw units), whatever the SAE reconstructs; the output score's resumed
    forward (mid-block for attn_out) agrees with the full spliced forward."""
    from pipeline.steering.output_score import output_scores
    from pipeline.steering.splice import SteeringEntry, sae_splice

    lm = load_model(tiny.hf_dir)
    d = lm.args.dim
    torch.manual_seed(2)
    hooks = {"hook_point": site}
    if "transcoder" in site:
        hooks = {"hook_point": "ffn_norm.1", "output_hook_point": "mlp_out.1", "skip": site.startswith("skip")}
    sae = TopKSae(
        SaeConfig(
            d_model=d, n_latents=3 * d, k=6, input_scale=0.5, output_scale=3.0, exclude_first_positions=1, **hooks
        )
    )
    if sae.cfg.skip:  # a skip path the steered reconstruction must keep, or the error term would remove it
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.3)
    target = sae.cfg.site_hook_point
    scale = sae.cfg.output_scale if sae.cfg.is_transcoder else sae.cfg.input_scale
    tokens = torch.randint(0, lm.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    row = sae.W_dec[7].detach() / scale
    with torch.no_grad():
        steered, _ = lm.model.run_with_hooks(tokens, splice={target: sae_splice(sae, [SteeringEntry(7, "add", 4.0)])})
        keep = (torch.arange(12) >= 1)[None, :, None]
        by_hand, _ = lm.model.run_with_hooks(tokens, splice={target: lambda v: torch.where(keep, v + 4.0 * row, v)})
        plain = lm.model(tokens)
    torch.testing.assert_close(steered, by_hand, rtol=1e-4, atol=1e-4)
    assert (steered - plain).abs().max() > 1e-3
    direction = (row / row.norm())[None]
    prompt = tokens[0].tolist()
    scores = output_scores(lm.model, target, direction, [prompt], 2.0, 1, [[[5, 9]]])
    with torch.no_grad():
        spliced, _ = lm.model.run_with_hooks(
            tokens[:1], splice={target: lambda v: torch.where(keep, v + 2.0 * direction[0], v)}
        )
    gain = spliced[0, -1].float().softmax(-1)[[5, 9]].sum() - plain[0, -1].float().softmax(-1)[[5, 9]].sum()
    assert float(scores[0, 0]) == pytest.approx(float(gain), rel=1e-3, abs=1e-6)


def test_a_run_trained_before_the_suite_flags_keeps_its_fingerprint():
    """The flags added for transcoders, Llama Scope's recipes and suites stay out of a run's fingerprint at their
    defaults: a run folder trained before them is reused, not refused as "made with other settings" (the main
    command failed so on the demo's runs/ until this). Set, they count."""
    from pipeline.core.output_folder import config_request
    from pipeline.sae.config import LATER_FIELDS, run_request

    before = {
        k: v for k, v in config_request(TrainConfig()).items() if k not in LATER_FIELDS
    }  # the request of the fields that existed before
    assert run_request(TrainConfig()) == before and "suite" not in before
    assert run_request(TrainConfig(k_start=64, k_anneal_steps=10))["k_start"] == 64
    assert run_request(TrainConfig(target_data="x"))["target_data"] == "x"
