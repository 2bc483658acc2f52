"""A suite of SAEs at every site (resid_post, attn_out, mlp_out) and JumpReLU transcoders (ffn_norm -> mlp_out,
with and without a skip connection) exported to SAELens folders in Llama Scope's layout, against the real
packages (sae-lens 6.x, TransformerLens 3.x) on the tiny Llama: SAELens' forward on raw activations is ours,
its splice into HookedSAETransformer gives our spliced loss, the suite imports back, and a Llama Scope-style
folder SAELens saved imports by folder name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    HookedSAETransformer,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from llama_3.errors import PipelineInputError
from pipeline.sae.formats import (
    export_saelens,
    export_saelens_suite,
    llama_scope_id,
    load_sae,
    load_saelens_suite,
)
from pipeline.sae.model import SaeConfig, TopKSae
from pipeline.sae.splice_eval import splice_eval

REPO = Path(__file__).resolve().parents[2]
LAYER = 1
TEXTS = [
    "Paris is the capital of France.",
    "The river runs to the sea, and the sea is wide.",
    "One two three four five six seven.",
    "She wrote the letter slowly, then read it twice.",
]


@pytest.fixture(scope="module")
def lm(tiny):
    from llama_3 import load_model

    return load_model(tiny.hf_dir)


@pytest.fixture(scope="module")
def hooked(tiny):
    """The tiny Llama as a plain LlamaForCausalLM in SAELens' HookedSAETransformer, unfolded norms (as SAELens'
    transcoders on ln2.hook_normalized need: the norm weight stays in ln2.w)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = HookedTransformerConfig(**convert_hf_model_config(str(tiny.hf_dir)), default_prepend_bos=False)
    model = HookedSAETransformer(cfg)
    model.load_and_process_state_dict(
        convert_llama_weights(tiny.reference, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    return model


def token_batches(lm) -> list[torch.Tensor]:
    return [torch.tensor([ids]) for ids in SaeConfig(1, 1, 1).tokenization.encode(lm.tokenizer, TEXTS)]


def captured(lm, hook_point: str) -> torch.Tensor:
    """[N, d] our model's activations at hook_point over TEXTS' tokens."""
    with torch.no_grad():
        return torch.cat([lm.model.capture(ids, [hook_point])[hook_point][0].float() for ids in token_batches(lm)])


def ln2_normalized(lm) -> torch.Tensor:
    """[N, d] TransformerLens' blocks.1.ln2.hook_normalized, computed from our resid_mid as our RMSNorm does (so
    that n * w is our ffn_norm bit for bit): the fold checked without two models' rounding."""
    x = captured(lm, f"resid_mid.{LAYER}")
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + lm.model.layers[LAYER].ffn_norm.eps)


def ffn_weight(lm) -> torch.Tensor:
    return lm.model.layers[LAYER].ffn_norm.weight.detach().clone()


def random_sae(lm, hook_point: str, expansion: int, seed: int, **kw) -> TopKSae:
    """An SAE (or transcoder) of ours at hook_point with every weight random and nonzero, a dataset scale
    != 1, and JumpReLU thresholds each latent's 60-95% quantile on the tiny model, so a few latents fire per token,
    a different few on each."""
    d = lm.args.dim
    torch.manual_seed(seed)
    activation = kw.pop("activation", "topk")
    cfg = SaeConfig(
        d_model=d,
        n_latents=expansion * d,
        k=6 if activation == "topk" else 0,
        activation=activation,
        input_scale=kw.pop("input_scale", 0.7),
        hook_point=hook_point,
        model=lm.identity(),
        **kw,
    )
    sae = TopKSae(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, d**-0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.5)
        if cfg.topk_by_decoder_norm:
            sae.W_dec.mul_(torch.rand(cfg.n_latents, 1) * 2 + 0.2)  # free norms that change the ranking
        if cfg.skip:
            sae.W_skip.normal_(0, 0.3 * d**-0.5)
        if activation == "jumprelu":
            pre = sae.encoder_input(sae.normalize_input(captured(lm, hook_point))[0]) @ sae.W_enc.t() + sae.b_enc
            q = torch.rand(cfg.n_latents) * 0.35 + 0.6
            sae.threshold.copy_(torch.stack([pre[:, i].quantile(q[i]) for i in range(cfg.n_latents)]).clamp_min(0.01))
    return sae


def suite_of(lm) -> dict[str, TopKSae]:
    """Llama Scope's four sites of block 1, and a second, plain transcoder of another width."""
    tc = dict(output_hook_point=f"mlp_out.{LAYER}", activation="jumprelu", input_scale=1.3, output_scale=2.5)
    saes = [
        random_sae(lm, f"resid_post.{LAYER}", 2, 0, topk_by_decoder_norm=True),
        random_sae(lm, f"attn_out.{LAYER}", 2, 1, input_scale=3.0),
        random_sae(lm, f"mlp_out.{LAYER}", 2, 2, activation="jumprelu"),
        random_sae(lm, f"ffn_norm.{LAYER}", 4, 3, skip=True, **tc),
        random_sae(lm, f"ffn_norm.{LAYER}", 2, 4, **tc),
    ]
    return {llama_scope_id(sae.cfg): sae for sae in saes}


@pytest.fixture(scope="module")
def release(lm, tmp_path_factory):
    """The suite, saved in our layout (so each SAE has a folder and sha256) and exported with export_saelens_suite."""
    root = tmp_path_factory.mktemp("suite")
    saes = {}
    for sae_id, sae in suite_of(lm).items():
        sae.save(root / "ours" / sae_id)
        saes[sae_id] = load_sae(root / "ours" / sae_id)
    export_saelens_suite(list(saes.values()), root / "release", norm_weights={LAYER: ffn_weight(lm)})
    return root / "release", saes


def dense(sae: TopKSae, x: torch.Tensor) -> torch.Tensor:
    out = sae(x)
    return torch.zeros(len(x), sae.cfg.n_latents).scatter_add(1, out.indices, out.values)


def test_llama_scope_ids():
    def sid(hook_point, n=128, **kw):
        return llama_scope_id(SaeConfig(d_model=64, n_latents=n, k=4, hook_point=hook_point, **kw))

    assert [sid("resid_post.15"), sid("resid_pre.16"), sid("attn_out.15"), sid("mlp_out.15", 512)] == [
        "L15R-2x",
        "L15R-2x",  # the same tensor: Llama Scope names a layer's output
        "L15A-2x",
        "L15M-8x",
    ]
    assert sid("ffn_norm.3", output_hook_point="mlp_out.3") == "L3TC-2x"
    assert sid("resid_mid.3", output_hook_point="mlp_out.3") == "L3-resid_mid-to-mlp_out-2x"
    assert [sid("resid_pre.0"), sid("resid_mid.2", 1000), sid("ffn_norm.2"), sid("attn_norm.0")] == [
        "L0-resid_pre-2x",  # the embeddings: no Llama Scope name
        "L2-resid_mid-1000",  # not a whole multiple of d_model: the latent count
        "L2-ffn_norm-2x",
        "L0-attn_norm-2x",
    ]


def test_the_suite_is_one_saelens_folder_per_sae_and_saelens_forward_is_ours(release, lm, hooked):
    out, saes = release
    index = json.loads((out / "index.json").read_text())
    assert (
        sorted(e["id"] for e in index["saes"]) == sorted(saes) == ["L1A-2x", "L1M-2x", "L1R-2x", "L1TC-2x", "L1TC-4x"]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([*saes, "index.json"])
    by_id = {e["id"]: e for e in index["saes"]}
    expected = {
        "L1R-2x": (TopKSAE, "blocks.1.hook_resid_post", None),
        "L1A-2x": (TopKSAE, "blocks.1.hook_attn_out", None),
        "L1M-2x": (JumpReLUSAE, "blocks.1.hook_mlp_out", None),
        "L1TC-4x": (JumpReLUSkipTranscoder, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
        "L1TC-2x": (JumpReLUTranscoder, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
    }
    for sae_id, sae in saes.items():
        theirs = SAE.load_from_disk(out / sae_id)
        kind, hook_name, hook_name_out = expected[sae_id]
        entry = by_id[sae_id]
        assert type(theirs) is kind and entry["architecture"] == theirs.cfg.architecture()
        assert (theirs.cfg.metadata.hook_name, theirs.cfg.metadata.hook_name_out) == (hook_name, hook_name_out)
        assert (entry["hook_name"], entry["hook_name_out"], entry["d_sae"]) == (
            hook_name,
            hook_name_out,
            theirs.cfg.d_sae,
        )
        assert (entry["hook_point"], entry["output_hook_point"]) == (sae.cfg.hook_point, sae.cfg.output_hook_point)
        assert entry["k"] == (sae.cfg.k or None) and entry["source_sha256"] == sae.sha256
        assert entry["model_identity"]["config_sha256"] == lm.identity()["config_sha256"]
        if sae.cfg.is_transcoder:
            assert theirs.cfg.apply_b_dec_to_input is False and theirs.cfg.d_out == lm.args.dim
            n = ln2_normalized(lm)
            x = n * ffn_weight(lm)  # our ffn_norm.1 bit for bit
            torch.testing.assert_close(x, captured(lm, "ffn_norm.1"), rtol=0, atol=0)
        else:
            x = captured(lm, sae.cfg.hook_point)
            n = x
        with torch.no_grad():
            latents = theirs.encode(n)
            y = theirs(n)  # a skip transcoder's forward adds W_skip n
            mine = dense(sae, x)
            if sae.cfg.topk_by_decoder_norm:  # SAELens' TopK values are pre x ||W_dec'|| (W_dec' = W_dec / s)
                mine = mine * sae.W_dec.norm(dim=1) / sae.cfg.input_scale
        counts = (latents > 0).sum(1)
        assert bool((counts > 0).all()), "every token has active latents: the check has teeth"
        if sae.cfg.activation == "jumprelu":
            assert counts.min() < counts.max()  # a varying number per token: the thresholds matter
        assert torch.equal(latents > 0, mine > 0)  # the same latents fire
        torch.testing.assert_close(latents, mine, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, sae(x).x_hat, rtol=1e-5, atol=1e-5)
    # the fold reads TransformerLens' own ln2.hook_normalized (another implementation: rounding apart)
    tc, theirs = saes["L1TC-4x"], SAE.load_from_disk(out / "L1TC-4x")
    with torch.no_grad():
        tl = torch.cat(
            [
                hooked.run_with_cache(ids, names_filter="blocks.1.ln2.hook_normalized")[1][
                    "blocks.1.ln2.hook_normalized"
                ][0]
                for ids in token_batches(lm)
            ]
        )
        torch.testing.assert_close(theirs(tl), tc(captured(lm, "ffn_norm.1")).x_hat, rtol=1e-4, atol=1e-4)


def hooked_loss(hooked, lm, sae: TopKSae, theirs, how: str) -> tuple[float, float]:
    """Mean per-token CE on TEXTS of the tiny Llama in HookedSAETransformer with SAELens' SAE spliced in, and
    clean: `how` "saes" (run_with_saes: SAELens' own splice at hook_name / hook_name_out) or "hooks" (a transcoder
    by hand: hook_mlp_out replaced by the transcoder's forward on ln2.hook_normalized)."""
    meta = theirs.cfg.metadata
    spliced, clean = [], []
    with torch.no_grad():
        for ids in sae.cfg.tokenization.encode(lm.tokenizer, TEXTS):
            tokens = torch.tensor([ids])
            clean.append(hooked(tokens, return_type="loss", loss_per_token=True)[0])
            if how == "saes":
                spliced.append(hooked.run_with_saes(tokens, saes=[theirs], return_type="loss", loss_per_token=True)[0])
                continue
            seen = {}

            def read(n, hook):
                seen["n"] = n
                return n

            def replace(y, hook):
                return theirs(seen.pop("n"))

            hooks = [(meta.hook_name, read), (meta.hook_name_out, replace)]
            spliced.append(hooked.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=hooks)[0])
    return float(torch.cat(spliced).mean()), float(torch.cat(clean).mean())


@pytest.mark.parametrize(
    "sae_id,how",
    [("L1R-2x", "saes"), ("L1A-2x", "saes"), ("L1M-2x", "saes"), ("L1TC-2x", "saes"), ("L1TC-4x", "hooks")],
)
def test_spliced_into_transformer_lens_each_gives_our_spliced_loss(release, lm, hooked, sae_id, how):
    """SAELens' splice of each exported SAE on the tiny Llama vs our training stage's splice evaluation of the
    original: the transcoders replace the MLP (our splice at mlp_out.1 reading ffn_norm.1). HookedSAETransformer
    splices a transcoder with encode + decode, which leave out a skip transcoder's W_skip (SAELens 6.54): the
    skip transcoder is spliced by hand, with its forward."""
    out, saes = release
    sae, theirs = saes[sae_id], SAE.load_from_disk(out / sae_id)
    ours = splice_eval(
        lm,
        sae.reconstruct,
        TEXTS,
        sae.cfg.site_hook_point,
        sae.cfg.tokenization,
        source=sae.cfg.hook_point if sae.cfg.is_transcoder else None,
    )
    spliced, clean = hooked_loss(hooked, lm, sae, theirs, how)
    assert ours["eval/ce_clean"] == pytest.approx(clean, rel=1e-4)
    assert ours["eval/ce_sae"] == pytest.approx(spliced, rel=1e-4)
    assert abs(ours["eval/ce_sae"] - ours["eval/ce_clean"]) > 1e-3  # the splice changed the loss: it has teeth


def test_the_suite_imports_back_with_the_same_forward(release, lm):
    out, saes = release
    back = load_saelens_suite(out)
    assert sorted(back) == sorted(saes)
    for sae_id, sae in saes.items():
        got = back[sae_id]
        for key in ("hook_point", "output_hook_point", "skip", "activation", "d_model", "n_latents", "k"):
            assert getattr(got.cfg, key) == getattr(sae.cfg, key), (sae_id, key)
        assert got.cfg.tokenization == sae.cfg.tokenization
        assert (
            got.model_mismatch(lm.identity()) is None
            and got.cfg.model["config_sha256"] == lm.identity()["config_sha256"]
        )
        x = captured(lm, sae.cfg.hook_point)
        with torch.no_grad():
            mine, again = sae(x), got(x)
        torch.testing.assert_close(again.x_hat, mine.x_hat, rtol=1e-4, atol=1e-4)
        assert torch.equal(dense(got, x) > 0, dense(sae, x) > 0)  # the same latents fire
    # the folder holds a suite, not one SAE: load_sae says so
    with pytest.raises(PipelineInputError, match="a suite of SAEs"):
        load_sae(out)


def saelens_transcoder(d: int, hook_name: str, seed: int) -> JumpReLUTranscoder:
    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook_name, hook_name_out="blocks.1.hook_mlp_out", prepend_bos=True, context_size=33)
    tc = JumpReLUTranscoder(
        JumpReLUTranscoderConfig(d_in=d, d_out=d, d_sae=3 * d, apply_b_dec_to_input=False, metadata=meta)
    )
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(0, 0.3)
        tc.threshold.uniform_(0.5, 1.5)
    return tc


def test_a_llama_scope_folder_saelens_saved_imports_by_folder_name(lm, tmp_path):
    """No index.json: L1R-8x/, L1A-8x/ (SAELens' save_model) and a Gemma Scope-style transcoder on
    ln2.hook_normalized in L1TC-3x/, which needs the model's ffn_norm weight to import."""
    d = lm.args.dim
    torch.manual_seed(0)
    resid = TopKSAE(TopKSAEConfig(d_in=d, d_sae=8 * d, k=5, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    attn = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=8 * d, metadata=SAEMetadata(hook_name="blocks.1.hook_attn_out")))
    for sae in (resid, attn):
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.3)
    with torch.no_grad():
        attn.threshold.uniform_(0.0, 0.3)
    resid.save_model(str(tmp_path / "L1R-8x"))
    attn.save_model(str(tmp_path / "L1A-8x"))
    tc = saelens_transcoder(d, "blocks.1.ln2.hook_normalized", 1)
    tc.save_model(str(tmp_path / "L1TC-3x"))
    (tmp_path / "notes").mkdir()  # a folder without cfg.json is not an SAE
    with pytest.raises(
        PipelineInputError, match=r"L1TC-3x/cfg.json: a transcoder on ln2.hook_normalized .*norm_weight"
    ):
        load_saelens_suite(tmp_path)
    w = ffn_weight(lm)
    ours = load_saelens_suite(tmp_path, norm_weights={1: w})
    assert sorted(ours) == ["L1A-8x", "L1R-8x", "L1TC-3x"]
    assert [ours[k].cfg.hook_point for k in sorted(ours)] == ["attn_out.1", "resid_post.1", "ffn_norm.1"]
    assert ours["L1TC-3x"].cfg.output_hook_point == "mlp_out.1" and ours["L1TC-3x"].cfg.activation == "jumprelu"
    for name, theirs, hook_point in (("L1R-8x", resid, "resid_post.1"), ("L1A-8x", attn, "attn_out.1")):
        x = captured(lm, hook_point)
        with torch.no_grad():
            torch.testing.assert_close(ours[name](x).x_hat, theirs(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dense(ours[name], x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    n = ln2_normalized(lm)
    with torch.no_grad():
        assert bool((tc.encode(n) > 0).any(1).all())
        torch.testing.assert_close(dense(ours["L1TC-3x"], n * w), tc.encode(n), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours["L1TC-3x"](n * w).x_hat, tc(n), rtol=1e-4, atol=1e-4)
    # a zero in the weight cannot be divided out
    w0 = w.clone()
    w0[3] = 0
    with pytest.raises(PipelineInputError, match="1 zero entries"):
        load_saelens_suite(tmp_path, norm_weights={1: w0})
    # a broken SAE folder: one line naming it
    (tmp_path / "L1A-8x" / "sae_weights.safetensors").write_bytes(b"broken")
    with pytest.raises(PipelineInputError) as e:
        load_saelens_suite(tmp_path, norm_weights={1: w})
    assert str(tmp_path / "L1A-8x") in str(e.value) and "\n" not in str(e.value)


def test_transcoders_on_the_mlp_input_import(lm, tmp_path):
    """hook_mlp_in (TransformerLens' resid_mid before ln2: Gemma Scope 2's transcoders) is our resid_mid;
    HookedSAETransformer's mlp.hook_in (after ln2's weight) is our ffn_norm: both import as they are."""
    for hook_name, ours_at in (("blocks.1.hook_mlp_in", "resid_mid.1"), ("blocks.1.mlp.hook_in", "ffn_norm.1")):
        tc = saelens_transcoder(lm.args.dim, hook_name, 2)
        tc.save_model(str(tmp_path / ours_at))
        ours = load_sae(tmp_path / ours_at)
        assert (ours.cfg.hook_point, ours.cfg.output_hook_point) == (ours_at, "mlp_out.1")
        x = captured(lm, ours_at)
        with torch.no_grad():
            torch.testing.assert_close(ours(x).x_hat, tc(x), rtol=1e-5, atol=1e-5)


def test_what_a_suite_cannot_hold_is_one_line_and_nothing_is_written(lm, tmp_path):
    post = random_sae(lm, "resid_post.1", 2, 0)
    pre = random_sae(lm, "resid_pre.2", 2, 1)  # the same tensor, the same width: the same id
    with pytest.raises(PipelineInputError, match="are both L1R-2x"):
        export_saelens_suite([post, pre], tmp_path / "dup")
    topk_tc = random_sae(lm, "ffn_norm.1", 2, 2, output_hook_point="mlp_out.1")
    with pytest.raises(
        PipelineInputError, match=r"a TopK transcoder.*convert it to JumpReLU first \(python sae.py jumprelu\)"
    ):
        export_saelens_suite([post, topk_tc], tmp_path / "topk", norm_weights={1: ffn_weight(lm)})
    with pytest.raises(PipelineInputError, match="convert it to JumpReLU first"):
        export_saelens(topk_tc, tmp_path / "single", norm_weight=ffn_weight(lm))
    jump_tc = random_sae(lm, "ffn_norm.1", 2, 3, output_hook_point="mlp_out.1", activation="jumprelu")
    with pytest.raises(PipelineInputError, match="which norm_weights lacks"):
        export_saelens_suite([post, jump_tc], tmp_path / "nonorm")
    with pytest.raises(PipelineInputError, match="pass norm_weight"):
        export_saelens(jump_tc, tmp_path / "single")
    assert not any(tmp_path.iterdir())  # every refusal came before the first folder
    # an index that no longer matches its folders
    export_saelens_suite([post], tmp_path / "ok")
    index = json.loads((tmp_path / "ok" / "index.json").read_text())
    index["saes"][0]["hook_point"] = "resid_post.0"
    (tmp_path / "ok" / "index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineInputError, match="lists hook_point 'resid_post.0', but"):
        load_saelens_suite(tmp_path / "ok")
    with pytest.raises(PipelineInputError, match="no index.json and no subfolder with a cfg.json"):
        load_saelens_suite(tmp_path / "ok" / "L1R-2x")


def test_the_export_cli_writes_a_suite_reading_the_norm_weight_from_the_model(lm, tiny, tmp_path):
    from sae import ExportConfig, export_main

    tc = random_sae(lm, "ffn_norm.1", 2, 3, output_hook_point="mlp_out.1", activation="jumprelu", skip=True)
    tc.cfg.model = {**lm.identity(), "path": str(tiny.hf_dir)}
    tc.save(tmp_path / "run_tc" / "sae")  # a training run folder: its SAE in sae/
    random_sae(lm, "attn_out.1", 2, 1).save(tmp_path / "attn")
    runs = [str(tmp_path / "run_tc"), str(tmp_path / "attn")]
    out = export_main(ExportConfig(format="saelens-suite", saes=runs, out=str(tmp_path / "release")))
    back = load_saelens_suite(out)
    assert sorted(back) == ["L1A-2x", "L1TC-2x"]
    x = captured(lm, "ffn_norm.1")
    with torch.no_grad():
        torch.testing.assert_close(back["L1TC-2x"](x).x_hat, tc(x).x_hat, rtol=1e-4, atol=1e-4)
    single = export_main(ExportConfig(sae=str(tmp_path / "run_tc" / "sae"), out=str(tmp_path / "single")))
    theirs = SAE.load_from_disk(single)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ln2_normalized(lm)), tc(x).x_hat, rtol=1e-4, atol=1e-4)
    # a TopK transcoder from the command line: one line, exit status 2
    random_sae(lm, "ffn_norm.1", 2, 2, output_hook_point="mlp_out.1").save(tmp_path / "topk_tc")
    argv = ["export", "--format", "saelens-suite", "--saes", str(tmp_path / "topk_tc"), "--out", str(tmp_path / "x")]
    proc = subprocess.run([sys.executable, str(REPO / "sae.py"), *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "convert it to JumpReLU first" in proc.stderr
