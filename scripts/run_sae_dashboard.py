"""Runs sae-dashboard 0.8 on a SAELens-format SAE (`python sae.py export --format saelens --unit-decoder`) and a
plain Hugging Face Llama folder (`llama_3.transformers_export.save_pretrained`), as its users do. Runs inside
.venv-sae-dashboard (scripts/install.sh --test makes it: sae-dashboard pins transformer-lens 2.x and numpy < 2,
which the project's environment does not have), so it imports nothing of this project; the README's recipe and
tests/sae/test_interop_sae_dashboard.py call it.

    .venv-sae-dashboard/bin/python scripts/run_sae_dashboard.py SAE_DIR HF_MODEL_DIR TOKENS.safetensors OUT.json \
        [--html OUT.html] [--features N]

TOKENS.safetensors holds `tokens` [batch, seq] (int), tokenized as the SAE was trained (BOS or not).
A plain transformers LlamaForCausalLM becomes a HookedTransformer; SaeVisRunner computes every feature's
statistics and top activations on the given tokens; OUT.json holds per feature its max, fraction nonzero and
its top examples (sequence, position, the window's token ids and activations), read from the dashboard's own data.
"""

from __future__ import annotations

import json
import sys

import torch
from sae_dashboard.sae_vis_data import SaeVisConfig
from sae_dashboard.sae_vis_runner import SaeVisRunner
from sae_lens import SAE
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import convert_hf_model_config
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import LlamaForCausalLM


def rope_fields(hf_config) -> dict:
    """TransformerLens 2.x's conversion of a Llama it has no official name for drops rope_theta (runs 10000)
    and Llama-3 scaling; these fields put them back (TransformerLens 3 reads them itself)."""
    fields = {"rotary_base": hf_config.rope_theta}
    scaling = hf_config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        fields |= {
            "use_NTK_by_parts_rope": True,
            "NTK_by_parts_factor": scaling["factor"],
            "NTK_by_parts_low_freq_factor": scaling["low_freq_factor"],
            "NTK_by_parts_high_freq_factor": scaling["high_freq_factor"],
            "NTK_original_ctx_len": scaling["original_max_position_embeddings"],
        }
    return fields


def main(sae_dir: str, model_dir: str, tokens_file: str, out: str, html: str | None, n_features: int | None) -> None:
    sae = SAE.load_from_disk(sae_dir)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # the folder's tokenizer.json (llama_3.transformers_export.save_pretrained writes ours) renders the pages
    converted = {**convert_hf_model_config(model_dir), **rope_fields(hf.config)}
    cfg = HookedTransformerConfig(**converted, default_prepend_bos=sae.cfg.metadata.prepend_bos)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    tokens = load_file(tokens_file)["tokens"]
    features = list(range(n_features or sae.cfg.d_sae))
    vis_cfg = SaeVisConfig(
        hook_point=sae.cfg.metadata.hook_name, features=features, minibatch_size_tokens=4, device="cpu"
    )
    data = SaeVisRunner(vis_cfg).run(encoder=sae, model=model, tokens=tokens)
    result = {"max": data.feature_stats.max, "frac_nonzero": data.feature_stats.frac_nonzero, "top": {}}
    for feature, feature_data in data.feature_data_dict.items():
        examples = []
        for group in feature_data.sequence_data.seq_group_data:
            if group.title.startswith("TOP ACTIVATIONS"):
                examples += [
                    (s.original_index, s.qualifying_token_index, s.token_ids, s.feat_acts) for s in group.seq_data
                ]
        result["top"][str(feature)] = examples
    with open(out, "w") as f:
        json.dump(result, f)
    if html:
        # only for --html; the module pulls the dashboard's HTML templates
        from sae_dashboard.data_writing_fns import save_feature_centric_vis

        save_feature_centric_vis(data, html)


if __name__ == "__main__":
    args = sys.argv[1:]
    html = args[args.index("--html") + 1] if "--html" in args else None
    n_features = int(args[args.index("--features") + 1]) if "--features" in args else None
    main(*args[:4], html, n_features)
