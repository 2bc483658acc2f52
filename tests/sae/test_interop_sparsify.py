"""sparsify interop against the real package (eai-sparsify, the bench peer): our export loads in
SparseCoder.load_from_disk and gives our latents and reconstruction; an SAE sparsify saves itself
imports into TopKSae and gives sparsify's own forward."""

from __future__ import annotations

import json

import pytest
import sparsify  # eai-sparsify, installed by scripts/install.sh --test (the .[bench] extra)
import torch

from llama_3.errors import PipelineInputError
from pipeline.sae.formats import export_sparsify
from pipeline.sae.model import SaeConfig, TopKSae


def trained_looking(normalize: str, seed: int = 0) -> TopKSae:
    torch.manual_seed(seed)
    cfg = SaeConfig(d_model=16, n_latents=64, k=5, normalize=normalize, input_scale=0.3, hook_point="resid_pre.3")
    sae = TopKSae(cfg)
    with torch.no_grad():  # non-trivial biases so every term matters
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.5)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


@pytest.mark.parametrize("normalize", ["dataset", "none"])
def test_sparsify_loads_our_export_with_our_latents_and_reconstruction(normalize, tmp_path):
    sae = trained_looking(normalize)
    export_sparsify(sae, tmp_path / "layers.3")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3")
    assert theirs.num_latents == 64 and theirs.cfg.k == 5 and theirs.d_in == 16
    torch.testing.assert_close(theirs.W_dec.norm(dim=1), torch.ones(64))  # unit rows, as sparsify keeps them
    x = torch.randn(40, 16) * 3
    with torch.no_grad():
        out = theirs(x)
        ours = sae(x)
    s = sae.cfg.input_scale if normalize == "dataset" else 1.0
    torch.testing.assert_close(out.sae_out, ours.x_hat, rtol=1e-4, atol=1e-4)
    mine = {(r, int(i)): float(v) for r in range(40) for i, v in zip(ours.indices[r], ours.values[r])}
    got = {(r, int(i)): float(v) for r in range(40) for i, v in zip(out.latent_indices[r], out.latent_acts[r])}
    assert set(got) == set(mine)  # the same latents fire
    for key, v in mine.items():
        assert got[key] == pytest.approx(v / s, rel=1e-4, abs=1e-5)  # activations ours / s


def test_an_sae_sparsify_saved_imports_with_its_forward(tmp_path):
    torch.manual_seed(1)
    theirs = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=48, k=6))
    with torch.no_grad():
        theirs.encoder.bias.normal_(0, 0.1)
        theirs.b_dec.normal_(0, 0.5)
    theirs.save_to_disk(tmp_path / "layers.7")
    ours = TopKSae.load(tmp_path / "layers.7")
    assert (ours.cfg.n_latents, ours.cfg.k, ours.cfg.hook_point) == (48, 6, "resid_post.7")
    x = torch.randn(50, 16) * 2
    with torch.no_grad():
        out, mine = theirs(x), ours(x)
    torch.testing.assert_close(mine.x_hat, out.sae_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine.indices.sort(-1).values, out.latent_indices.sort(-1).values)
    # round trip: our export of the import is what sparsify saved
    export_sparsify(ours, tmp_path / "again" / "layers.7")
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "again" / "layers.7")
    for name, t in theirs.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], t)
    # an imported SAE carries its width: a model of another width is refused by name
    with pytest.raises(PipelineInputError, match="d_model"):
        ours.check_model({"path": "m", "d_model": 17}, "--sae x")


def test_foreign_sparsify_folders_are_refused_with_one_line(tmp_path):
    theirs = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=32, k=4))
    theirs.save_to_disk(tmp_path / "layers.2.mlp")
    with pytest.raises(PipelineInputError, match="layers.N"):
        TopKSae.load(tmp_path / "layers.2.mlp")
    grouped = tmp_path / "layers.4"
    theirs.save_to_disk(grouped)
    cfg = json.loads((grouped / "cfg.json").read_text())
    (grouped / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(PipelineInputError, match="only plain TopK"):
        TopKSae.load(grouped)


def test_the_export_cli_names_the_sparsify_hookpoint_and_round_trips(tmp_path, capsys):
    from sae import ExportConfig, export_main

    sae = trained_looking("dataset")  # at resid_pre.3: the output of decoder layer 2
    sae.save(tmp_path / "ours")
    out = export_main(ExportConfig(sae=str(tmp_path / "ours"), format="sparsify", out=str(tmp_path / "x")))
    assert out == tmp_path / "x" / "layers.2"
    back = TopKSae.load(out)
    assert back.cfg.hook_point == "resid_post.2"  # the same tensor as resid_pre.3
    x = torch.randn(20, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, rtol=1e-4, atol=1e-4)
    with pytest.raises(PipelineInputError, match="not an empty folder"):
        export_main(ExportConfig(sae=str(tmp_path / "ours"), format="saelens", out=str(tmp_path / "x")))
    mid = trained_looking("none")
    mid.cfg.hook_point = "resid_mid.3"
    mid.save(tmp_path / "mid")
    with pytest.raises(PipelineInputError, match="layers.N"):
        export_main(ExportConfig(sae=str(tmp_path / "mid"), format="sparsify", out=str(tmp_path / "y")))
