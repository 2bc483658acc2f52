"""SAELens interop against the real package (sae-lens 6.x): an SAE that SAELens saves itself imports
into TopKSae with SAELens' own forward and the metadata's tokenization; our export imports back."""

from __future__ import annotations

import pytest
import torch
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from llama_3.errors import PipelineInputError
from pipeline.sae.formats import export_saelens, export_sparsify
from pipeline.sae.model import SaeConfig, TopKSae


def randomized(sae):
    """SAELens starts some parameters at zero (b_enc, b_dec, threshold): make every term matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.6)  # Gemma Scope's are per latent and positive
    return sae


def saved_by_saelens(path, **metadata) -> TopKSAE:
    meta = {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny", "context_size": 17, "prepend_bos": True}
    theirs = randomized(TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=6, metadata=SAEMetadata(**{**meta, **metadata}))))
    theirs.save_model(str(path))
    return theirs


def test_an_sae_saelens_saved_imports_with_its_forward_and_its_tokenization(tmp_path):
    theirs = saved_by_saelens(tmp_path / "lens", seqpos_slice=(3, None))
    ours = TopKSae.load(tmp_path / "lens")
    cfg = ours.cfg
    assert (cfg.d_model, cfg.n_latents, cfg.k, cfg.hook_point) == (16, 48, 6, "resid_post.3")
    # BOS prepended, positions 0..2 skipped (BOS + 2 text positions), 17 positions with BOS
    assert (cfg.add_bos, cfg.exclude_first_positions, cfg.max_tokens) == (True, 2, 16)
    x = torch.randn(40, 16) * 2
    with torch.no_grad():
        latents = theirs.encode(x)
        x_hat = theirs.decode(latents)
        mine = ours(x)
    dense = torch.zeros(40, 48).scatter(1, mine.indices, mine.values)
    torch.testing.assert_close(dense, latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.x_hat, x_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit_decoder", [False, True])
def test_our_export_imports_back_with_the_same_forward_and_tokenization(tmp_path, unit_decoder):
    torch.manual_seed(3)
    cfg = SaeConfig(
        d_model=16,
        n_latents=64,
        k=5,
        input_scale=0.3,
        hook_point="resid_mid.2",
        add_bos=False,
        exclude_first_positions=1,
        max_tokens=40,
    )
    sae = TopKSae(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.5)
    export_saelens(sae, tmp_path / "lens", unit_decoder=unit_decoder)
    back = TopKSae.load(tmp_path / "lens")
    assert back.cfg.hook_point == "resid_mid.2" and back.cfg.tokenization == cfg.tokenization
    x = torch.randn(30, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, rtol=1e-4, atol=1e-4)
        assert torch.equal(back(x).indices.sort(-1).values, sae(x).indices.sort(-1).values)


def assert_same_forward(theirs, ours: TopKSae, x: torch.Tensor, atol: float = 1e-5) -> None:
    """Our code (values, indices) densified equals SAELens' encode, our reconstruction its decode; a latent
    whose pre-activation lies within rounding of its threshold may differ (none did in these tests)."""
    with torch.no_grad():
        latents = theirs.encode(x)
        x_hat = theirs.decode(latents)
        mine = ours(x)
    dense = torch.zeros(len(x), ours.cfg.n_latents).scatter_add(1, mine.indices, mine.values)
    assert bool((latents > 0).any(1).all()), "every row has active latents: the check has teeth"
    torch.testing.assert_close(dense, latents, rtol=1e-5, atol=atol)
    torch.testing.assert_close(mine.x_hat, x_hat, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("apply_b_dec_to_input", [False, True])
@pytest.mark.parametrize("kind", ["jumprelu", "standard"])
def test_jumprelu_and_relu_saes_saelens_saved_import_with_their_forward(tmp_path, kind, apply_b_dec_to_input):
    """Gemma Scope's layout (JumpReLU, per-latent thresholds, b_dec not subtracted) and SAELens' standard
    ReLU SAE: our code is theirs token for token, with a varying number of active latents per token."""
    meta = SAEMetadata(hook_name="blocks.2.hook_resid_post", prepend_bos=True, context_size=33)
    make = {"jumprelu": (JumpReLUSAE, JumpReLUSAEConfig), "standard": (StandardSAE, StandardSAEConfig)}[kind]
    theirs = randomized(make[0](make[1](d_in=16, d_sae=96, apply_b_dec_to_input=apply_b_dec_to_input, metadata=meta)))
    theirs.save_model(str(tmp_path / "lens"))
    ours = TopKSae.load(tmp_path / "lens")
    assert (ours.cfg.activation, ours.cfg.k, ours.cfg.hook_point) == ("jumprelu", 0, "resid_post.2")
    assert (ours.cfg.add_bos, ours.cfg.max_tokens) == (True, 32)
    x = torch.randn(64, 16) * 2
    with torch.no_grad():
        counts = (theirs.encode(x) > 0).sum(1)
    assert counts.min() < counts.max()  # the code's width really varies per token
    assert_same_forward(theirs, ours, x)
    assert ours(x).values.shape[1] == int(counts.max())  # one batch: the widest token's count, no truncation


def test_a_llama_scope_sae_through_saelens_own_loader_imports_with_its_forward(tmp_path, monkeypatch):
    """Llama Scope as it ships (hyperparams.json + checkpoints/final.safetensors, TopK-trained, served as
    JumpReLU with one threshold and a dataset-wise input norm) through SAELens' own from_pretrained, the hub
    replaced by a local folder: SAELens folds the norm into the weights; save_model; our import = its forward."""
    import json
    import math

    import sae_lens.loading.pretrained_sae_loaders as loaders
    from safetensors.torch import save_file

    d, n = 32, 256
    folder = tmp_path / "hub" / "Llama3_1-8B-Base-L0R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    # SAELens' release table holds the norm factor sqrt(4096) / average norm; ours gives the same factor
    hyper = {"d_model": d, "d_sae": n, "hook_point_in": "blocks.0.hook_resid_post", "jump_relu_threshold": 0.1}
    hyper["dataset_average_activation_norm"] = {"in": math.sqrt(d) / 58.935251798561154, "out": 1.0}
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    g = torch.Generator().manual_seed(1)
    weights = {
        "encoder.weight": torch.randn(n, d, generator=g) * 0.1,
        "encoder.bias": torch.randn(n, generator=g) * 0.1,
    }
    weights |= {"decoder.weight": torch.randn(d, n, generator=g) * 0.1, "decoder.bias": torch.randn(d, generator=g)}
    save_file(weights, str(folder / "checkpoints" / "final.safetensors"))

    def from_local_hub(repo_id, filename, subfolder=None, **_):
        assert repo_id == "fnlp/Llama3_1-8B-Base-LXR-8x"
        return str(tmp_path / "hub" / (subfolder or "") / filename)

    monkeypatch.setattr(loaders, "hf_hub_download", from_local_hub)
    theirs = SAE.from_pretrained("llama_scope_lxr_8x", "l0r_8x", device="cpu")
    for p in theirs.parameters():  # SAELens 6.54's save_model refuses its own transposed W_dec view
        p.data = p.data.contiguous()
    theirs.save_model(str(tmp_path / "saved"))
    ours = TopKSae.load(tmp_path / "saved")
    assert (ours.cfg.activation, ours.cfg.hook_point, ours.cfg.add_bos) == ("jumprelu", "resid_post.0", True)
    assert ours.cfg.model["name"] == "meta-llama/Llama-3.1-8B"
    x = torch.randn(64, d) / 58.935251798561154 * 8  # raw residuals, ~1/factor of the SAE's normalised scale
    assert_same_forward(theirs, ours, x, atol=1e-4)


def test_our_jumprelu_import_exports_back_to_saelens(tmp_path):
    theirs = randomized(
        JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=64, metadata=SAEMetadata(hook_name="blocks.4.hook_resid_pre")))
    )
    theirs.save_model(str(tmp_path / "lens"))
    export_saelens(TopKSae.load(tmp_path / "lens"), tmp_path / "again")
    back = SAE.load_from_disk(tmp_path / "again")
    assert type(back) is JumpReLUSAE
    x = torch.randn(32, 16) * 2
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(PipelineInputError, match="decoder rows are not unit norm"):
        export_saelens(TopKSae.load(tmp_path / "lens"), tmp_path / "unit", unit_decoder=True)
    with pytest.raises(PipelineInputError, match="sparsify's coders are TopK"):
        export_sparsify(TopKSae.load(tmp_path / "lens"), tmp_path / "sparsify")


def test_saelens_saes_we_cannot_run_are_refused_with_one_line(tmp_path):
    gated = GatedSAE(GatedSAEConfig(d_in=16, d_sae=32, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    gated.save_model(str(tmp_path / "gated"))
    with pytest.raises(PipelineInputError, match="a SAELens 'gated' SAE; only topk, jumprelu and standard"):
        TopKSae.load(tmp_path / "gated")
    saved_by_saelens(tmp_path / "attn", hook_name="blocks.1.attn.hook_z")
    with pytest.raises(PipelineInputError, match="not a residual-stream hook"):
        TopKSae.load(tmp_path / "attn")


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_top_sentences_and_steering_run_on_an_sae_saelens_saved(tiny, tmp_path, kind):
    from capture_top_activating_sentences import main as top_main
    from llama_3 import load_model
    from openwebtext_sentences_dataset import main as sentences_main
    from pipeline.sentences.config import SentencesConfig
    from pipeline.sentences.dataset import iter_sentences
    from pipeline.steering.session import Session
    from pipeline.steering.splice import SteeringEntry
    from pipeline.top_sentences.config import TopSentencesConfig
    from pipeline.top_sentences.tables import open_top_sentences

    lm = load_model(tiny.hf_dir)
    torch.manual_seed(0)
    meta = SAEMetadata(hook_name="blocks.1.hook_resid_pre", context_size=13, prepend_bos=True, seqpos_slice=(1, None))
    if kind == "topk":
        theirs = randomized(TopKSAE(TopKSAEConfig(d_in=lm.args.dim, d_sae=32, k=4, metadata=meta)))
    else:
        theirs = randomized(JumpReLUSAE(JumpReLUSAEConfig(d_in=lm.args.dim, d_sae=32, metadata=meta)))
        with torch.no_grad():
            theirs.threshold.uniform_(1.0, 4.0)  # a few latents per token, a different few on each
    theirs.save_model(str(tmp_path / "lens"))
    sentences_main(SentencesConfig(out=str(tmp_path / "s"), max_documents=10, splitter="trained"))
    top_main(
        TopSentencesConfig(
            sae=str(tmp_path / "lens"),
            sentences=str(tmp_path / "s"),
            out=str(tmp_path / "top"),
            model=str(tiny.hf_dir),
            top_n=3,
            device="cpu",
            model_dtype="float32",
            max_sentences=0,
            max_batch_tokens=39,  # 3 sentences a batch: JumpReLU codes of different widths in one code store
        )
    )
    texts = {sid: t for part in iter_sentences(tmp_path / "s") for sid, t in zip(part["sentence_id"], part["text"])}
    rows = [
        r for r in open_top_sentences(tmp_path / "top").table("top_sentences").to_pylist() if r["aggregation"] == "max"
    ]
    assert rows
    for r in rows[:20]:  # the reference: SAELens' own encode on BOS + 12 text tokens, BOS left out
        ids = lm.tokenizer.encode(texts[r["sentence_id"]], bos=True)[:13]
        with torch.no_grad():
            acts = lm.model.capture(torch.tensor([ids]), ["resid_pre.1"])["resid_pre.1"][0].float()
            h = theirs.encode(acts)[1:, r["latent"]]
        assert r["score"] == pytest.approx(float(h.max()), rel=1e-4, abs=1e-5)
        # per-token activations (read back from the code store) are SAELens' too; BOS is not a text token
        assert r["token_activations"] == pytest.approx([0.0, *h.tolist()][-len(r["token_activations"]) :], abs=1e-4)
    session = Session.open(str(tiny.hf_dir), str(tmp_path / "lens"), str(tmp_path / "none"), "cpu", "float32")
    [(plain, steered)] = session.complete(
        [session.text_prompts(["The capital of France"])[0]],
        [SteeringEntry(0, "add", 40.0)],
        max_new_tokens=4,
        temperature=0,
    )
    assert plain.tokens != steered.tokens  # the imported latent steers
    # the page's and the CLI's --inspect table: each generated token's strongest latents are SAELens'
    tokens = plain.prompt_tokens + plain.tokens
    with torch.no_grad():
        acts = lm.model.capture(torch.tensor([tokens]), ["resid_pre.1"])["resid_pre.1"][0].float()
        h = theirs.encode(acts)[len(plain.prompt_tokens) :]
    for row, table in zip(h, session.inspect(plain, [], "all", top=3)):
        top = row.topk(3)
        assert [e["latent"] for e in table["latents"]] == [i for i, v in zip(top.indices.tolist(), top.values) if v > 0]


def test_transformer_lens_with_our_saelens_export_gives_our_spliced_loss(tiny, tmp_path):
    """The recipe a SAELens user runs: a plain LlamaForCausalLM in TransformerLens, the exported SAE at
    its hook_name on the positions its seqpos_slice names; the loss equals our spliced model's."""
    from sae_lens import SAE
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from llama_3 import load_model
    from llama_3.hooks import Splice

    lm = load_model(tiny.hf_dir)
    torch.manual_seed(5)
    sae = TopKSae(
        SaeConfig(
            d_model=lm.args.dim,
            n_latents=128,
            k=8,
            input_scale=0.2,
            hook_point="resid_pre.2",
            exclude_first_positions=1,
            model=lm.identity(),
        )
    )
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.5)
    export_saelens(sae, tmp_path / "lens")
    theirs = SAE.load_from_disk(tmp_path / "lens")
    meta = theirs.cfg.metadata
    assert meta.prepend_bos is False and list(meta.seqpos_slice) == [1, None]
    cfg = HookedTransformerConfig(**convert_hf_model_config(str(tiny.hf_dir)), default_prepend_bos=meta.prepend_bos)
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        convert_llama_weights(tiny.reference, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    ids = torch.tensor([lm.tokenizer.encode("Paris is the capital of France; Berlin is the capital of Germany.")])
    start = meta.seqpos_slice[0]

    def splice_theirs(x, hook):
        x = x.clone()
        x[:, start:] = theirs(x[:, start:])
        return x

    with torch.no_grad():
        clean_tl = tl(ids, return_type="loss")
        spliced_tl = tl.run_with_hooks(ids, return_type="loss", fwd_hooks=[(meta.hook_name, splice_theirs)])
        ours, _ = lm.model.run_with_hooks(ids, splice={"resid_pre.2": Splice(sae.reconstruct, skip_first_positions=1)})
        clean_ours = lm.model(ids)
    loss = torch.nn.functional.cross_entropy
    assert float(clean_tl) == pytest.approx(float(loss(clean_ours[0, :-1].float(), ids[0, 1:])), rel=1e-4)
    assert float(spliced_tl) == pytest.approx(float(loss(ours[0, :-1].float(), ids[0, 1:])), rel=1e-4)
    assert abs(float(spliced_tl) - float(clean_tl)) > 1e-3  # the splice changed the loss: the check has teeth


def test_a_pre_6_saelens_topk_config_and_a_broken_weights_file(tmp_path):
    """SAELens < 6 wrote activation_fn "topk" with activation_fn_kwargs and the metadata at the top level."""
    import json

    theirs = saved_by_saelens(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    old = {k: v for k, v in cfg.items() if k not in ("metadata", "architecture", "k")}
    old |= {**cfg["metadata"], "activation_fn": "topk", "activation_fn_kwargs": {"k": cfg["k"]}}
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(old))
    ours = TopKSae.load(tmp_path / "old")
    assert (ours.cfg.k, ours.cfg.hook_point) == (6, "resid_post.3")
    x = torch.randn(10, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).x_hat, theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-5)
    (tmp_path / "old" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PipelineInputError, match="sae_weights.safetensors: cannot be read"):
        TopKSae.load(tmp_path / "old")


@pytest.mark.parametrize("kind", ["our_export", "their_jumprelu"])
def test_hooked_sae_transformer_splice_gives_our_spliced_loss(tiny, tmp_path, kind):
    """SAELens' own splice (HookedSAETransformer.run_with_saes, every position) on the tiny Llama as a plain
    LlamaForCausalLM, against our training stage's splice evaluation (pipeline/sae/splice_eval.py) of the same SAE:
    our TopK SAE exported to SAELens, or a JumpReLU SAE SAELens saved and we imported."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from llama_3 import load_model
    from pipeline.sae.splice_eval import splice_eval

    lm = load_model(tiny.hf_dir)
    meta = SAEMetadata(hook_name="blocks.2.hook_resid_pre", prepend_bos=False, context_size=64)
    if kind == "our_export":
        torch.manual_seed(6)
        cfg = SaeConfig(d_model=lm.args.dim, n_latents=96, k=6, input_scale=0.2, hook_point="resid_pre.2")
        ours = TopKSae(cfg)
        with torch.no_grad():
            ours.b_pre.normal_(0, 0.5)
        export_saelens(ours, tmp_path / "lens")
        theirs = SAE.load_from_disk(tmp_path / "lens")
    else:
        theirs = randomized(JumpReLUSAE(JumpReLUSAEConfig(d_in=lm.args.dim, d_sae=96, metadata=meta)))
        with torch.no_grad():
            theirs.threshold.uniform_(0.5, 2.0)
        theirs.save_model(str(tmp_path / "lens"))
        ours = TopKSae.load(tmp_path / "lens")
    assert ours.cfg.tokenization.skip_first_positions == 0  # every position spliced, as run_with_saes does
    tl_cfg = HookedTransformerConfig(**convert_hf_model_config(str(tiny.hf_dir)), default_prepend_bos=False)
    hooked = HookedSAETransformer(tl_cfg)
    hooked.load_and_process_state_dict(
        convert_llama_weights(tiny.reference, tl_cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    texts = ["Paris is the capital of France.", "The river runs to the sea, and the sea is wide.", "One two three."]
    losses, clean = [], []
    with torch.no_grad():
        for ids in ours.cfg.tokenization.encode(lm.tokenizer, texts):
            tokens = torch.tensor([ids])
            losses.append(hooked.run_with_saes(tokens, saes=[theirs], return_type="loss", loss_per_token=True)[0])
            clean.append(hooked(tokens, return_type="loss", loss_per_token=True)[0])
    mine = splice_eval(lm, ours.reconstruct, texts, "resid_pre.2", ours.cfg.tokenization)
    assert mine["eval/ce_sae"] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-4)
    assert mine["eval/ce_clean"] == pytest.approx(float(torch.cat(clean).mean()), rel=1e-4)
    assert abs(mine["eval/ce_sae"] - mine["eval/ce_clean"]) > 1e-3  # the splice changed the loss: it has teeth
