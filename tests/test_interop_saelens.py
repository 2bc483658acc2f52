"""SAELens interop against the real package (sae-lens 6.x): an SAE that SAELens saves itself imports
into TopKSae with SAELens' own forward and the metadata's tokenization; our export imports back."""

from __future__ import annotations

import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from llama_3.errors import PipelineInputError
from sae import SaeConfig, TopKSae


def saved_by_saelens(path, **metadata) -> TopKSAE:
    torch.manual_seed(0)
    meta = {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny", "context_size": 17, "prepend_bos": True}
    theirs = TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=6, metadata=SAEMetadata(**{**meta, **metadata})))
    with torch.no_grad():  # SAELens starts some of these at zero: make every term matter
        for p in theirs.parameters():
            p.normal_(0, 0.3)
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
    sae.export_saelens(tmp_path / "lens", unit_decoder=unit_decoder)
    back = TopKSae.load(tmp_path / "lens")
    assert back.cfg.hook_point == "resid_mid.2" and back.cfg.tokenization == cfg.tokenization
    x = torch.randn(30, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, rtol=1e-4, atol=1e-4)
        assert torch.equal(back(x).indices.sort(-1).values, sae(x).indices.sort(-1).values)


def test_saelens_saes_we_cannot_run_are_refused_with_one_line(tmp_path):
    jump = JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=32, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    jump.save_model(str(tmp_path / "jump"))
    with pytest.raises(PipelineInputError, match="only TopK SAEs import"):
        TopKSae.load(tmp_path / "jump")
    saved_by_saelens(tmp_path / "attn", hook_name="blocks.1.attn.hook_z")
    with pytest.raises(PipelineInputError, match="not a residual-stream hook"):
        TopKSae.load(tmp_path / "attn")


def test_top_sentences_and_steering_run_on_an_sae_saelens_saved(tiny, tmp_path):
    from capture_top_activating_sentences import TopSentencesConfig
    from capture_top_activating_sentences import main as top_main
    from llama_3 import load_model
    from openwebtext_sentences_dataset import SentencesConfig
    from openwebtext_sentences_dataset import main as sentences_main
    from pipeline.sentences import iter_sentences
    from pipeline.steering import SteeringEntry
    from pipeline.steering_session import Session
    from pipeline.top_sentences import open_top_sentences

    lm = load_model(tiny.hf_dir)
    torch.manual_seed(0)
    meta = SAEMetadata(hook_name="blocks.1.hook_resid_pre", context_size=13, prepend_bos=True, seqpos_slice=(1, None))
    theirs = TopKSAE(TopKSAEConfig(d_in=lm.args.dim, d_sae=32, k=4, metadata=meta))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
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
            meanings=str(tmp_path / "none"),
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
    session = Session.open(str(tiny.hf_dir), str(tmp_path / "lens"), str(tmp_path / "none"), "cpu", "float32")
    [(plain, steered)] = session.complete(
        [session.text_prompts(["The capital of France"])[0]],
        [SteeringEntry(0, "add", 40.0)],
        max_new_tokens=4,
        temperature=0,
    )
    assert plain.tokens != steered.tokens  # the imported latent steers


def test_transformer_lens_with_our_saelens_export_gives_our_spliced_loss(tiny, tmp_path):
    """The recipe a SAELens user runs: a plain LlamaForCausalLM in TransformerLens, the exported SAE at
    its hook_name on the positions its seqpos_slice names; the loss equals our spliced model's."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from llama_3 import load_model
    from llama_3.hooks import Splice
    from sae_lens import SAE

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
    sae.export_saelens(tmp_path / "lens")
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
