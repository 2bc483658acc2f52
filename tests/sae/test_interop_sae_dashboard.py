"""sae-dashboard (0.8, the real package) on our --unit-decoder SAELens export: it accepts the SAE, and its
feature statistics and top activations are our SAE's, on a tiny Llama GGUF saved as a plain LlamaForCausalLM.

sae-dashboard pins transformer-lens 2.x and numpy < 2, so it runs in its own venv (.venv-sae-dashboard, made
by scripts/install.sh --test with the project's torch, no other torch build) through scripts/run_sae_dashboard.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llama_3 import load_model
from llama_3.transformers_export import save_pretrained, to_transformers
from pipeline.sae.formats import export_saelens
from pipeline.sae.model import SaeConfig, TopKSae

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = Path(os.environ.get("SAE_DASHBOARD_PYTHON", REPO / ".venv-sae-dashboard" / "bin" / "python"))

pytestmark = pytest.mark.slow


def test_sae_dashboard_shows_our_latents_on_our_export(tiny, tmp_path):
    assert VENV_PYTHON.is_file(), f"{VENV_PYTHON}: missing; `bash scripts/install.sh --test` makes it"
    # the README's recipe from a GGUF (as the embedded SmolLM2 ships; this one has Llama-3 rope_freqs): a plain
    # LlamaForCausalLM with our tokenizer, saved so that transformers 4.x (sae-dashboard's) reads its RoPE too
    lm = load_model(tiny.gguf_path)
    save_pretrained(to_transformers(lm), tmp_path / "hf", tokenizer=lm.tokenizer)
    torch.manual_seed(4)
    n_latents = 24
    sae = TopKSae(SaeConfig(d_model=lm.args.dim, n_latents=n_latents, k=4, input_scale=0.25, hook_point="resid_post.1"))
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.2)
    export_saelens(sae, tmp_path / "lens", unit_decoder=True)
    tokens = torch.randint(3, lm.args.vocab_size, (32, 16), generator=torch.Generator().manual_seed(0))
    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))

    def dashboard(sae_dir, out, *extra):
        args = [
            str(tmp_path / sae_dir),
            str(tmp_path / "hf"),
            str(tmp_path / "tokens.safetensors"),
            str(tmp_path / out),
        ]
        script = str(REPO / "scripts" / "run_sae_dashboard.py")
        return subprocess.run([str(VENV_PYTHON), script, *args, *extra], capture_output=True, text=True, timeout=600)

    run = dashboard("lens", "dash.json", "--html", str(tmp_path / "dash.html"))
    assert run.returncode == 0, run.stderr[-3000:]
    export_saelens(sae, tmp_path / "default")  # decoder rows of norm 1 / input_scale: the dashboard refuses them
    refused = dashboard("default", "refused.json")
    assert refused.returncode != 0 and "Folding W_dec_norm is not safe for TopKSAEs" in refused.stderr
    dash = json.loads((tmp_path / "dash.json").read_text())

    # ours: every position's code (the dashboard encodes every position), in the export's units: latents / s
    with torch.no_grad():
        acts = lm.model.capture(tokens, ["resid_post.1"])["resid_post.1"].float()  # [32, 16, d]
        out = sae(acts.reshape(-1, lm.args.dim))
    dense = torch.zeros(len(out.values), n_latents).scatter(1, out.indices, out.values) / 0.25  # [512, L]
    assert (dense.max(0).values > 0).sum() >= n_latents // 2  # most latents fire: the comparison has teeth
    torch.testing.assert_close(torch.tensor(dash["max"]), dense.max(0).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(dash["frac_nonzero"]), (dense > 0).float().mean(0), rtol=0, atol=1e-6)
    per_token = dense.reshape(32, 16, n_latents)
    for feature, examples in dash["top"].items():
        for seq, pos, window_ids, window_acts in examples:  # a window of the sequence around the top token
            row = tokens[seq].tolist()
            starts = [a for a in range(len(row)) if row[a : a + len(window_ids)] == window_ids and a <= pos]
            assert starts, f"feature {feature}: window not in sequence {seq}"
            ours = per_token[seq, starts[0] : starts[0] + len(window_ids), int(feature)]
            torch.testing.assert_close(torch.tensor(window_acts), ours, rtol=1e-4, atol=2e-4)  # it rounds to 4 digits
    assert sum(len(e) for e in dash["top"].values()) > n_latents // 2
    assert (tmp_path / "dash.html").stat().st_size > 10_000  # the dashboard page itself was written
