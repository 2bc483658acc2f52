"""The SAE, for users: `from sae import TopKSae, SaeConfig, load_sae` (pipeline/sae/model.py and formats.py),
and the export and JumpReLU post-processing commands.

Usage (export):
    python sae.py export --format sparsify --out exports     # -> exports/layers.24 for a resid_pre.25 SAE
    python sae.py export --format saelens --sae runs/sae/sae --out exports/saelens [--unit-decoder]
    python sae.py export --format saelens-suite --saes runs/suite/* --out release  # release/L15R-8x, ..., index.json
    python sae.py jumprelu --sae runs/sae/sae --out runs/sae_jumprelu    # TopK -> JumpReLU, thresholds from its data

SAELens takes SAEs at resid_pre / resid_mid / resid_post / attn_out / mlp_out and JumpReLU transcoders (a TopK
one: `python sae.py jumprelu` first); a transcoder on ffn_norm.L exports with its model's RMSNorm weight folded in,
read from the checkpoint its cfg.json names (or --model). A suite writes one SAELens folder per SAE, named by its
Llama Scope-style id (L15R-8x, L15A-8x, L15M-8x, L15TC-8x), and index.json; `load_saelens_suite` reads it back.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llama_3.errors import PipelineInputError
from llama_3.hooks import HookPoint
from pipeline.core.cli import check_choices, parse_config, run_main
from pipeline.core.layout import SAE_WEIGHTS_DIR
from pipeline.sae.formats import (
    SAELENS_FORMAT_VERSION,
    TRANSFORMERLENS_HOOKS,
    check_saelens_suite,
    export_saelens,
    export_saelens_suite,
    export_sparsify,
    llama_scope_id,
    load_sae,
    load_saelens_suite,
    sae_sha256,
    saelens_hooks,
    sparsify_hookpoint,
)
from pipeline.sae.jumprelu import convert
from pipeline.sae.model import ENCODER_INIT_NORM, SAE_CONFIG, SaeConfig, SaeOutput, TopKSae, sparse_decode
from pipeline.sae.training_run import SAE_SUBDIR

__all__ = [
    "ENCODER_INIT_NORM",
    "SAELENS_FORMAT_VERSION",
    "TRANSFORMERLENS_HOOKS",
    "ExportConfig",
    "SaeConfig",
    "SaeOutput",
    "TopKSae",
    "export_main",
    "export_saelens",
    "export_saelens_suite",
    "export_sparsify",
    "llama_scope_id",
    "load_sae",
    "load_saelens_suite",
    "sae_sha256",
    "sparse_decode",
    "sparsify_hookpoint",
]

ExportFormat = Literal["saelens", "saelens-suite", "sparsify"]


@dataclass
class ExportConfig:
    sae: str = str(SAE_WEIGHTS_DIR)
    """SAE folder (ours, or sparsify's layout)."""
    format: ExportFormat = "saelens"
    """Saelens, saelens-suite (--saes) or sparsify."""
    out: str = ""
    """Output folder (new or empty)."""
    unit_decoder: bool = False
    """Saelens: unit decoder rows, rescale_acts_by_decoder_norm (for sae-dashboard)."""
    saes: list[str] = field(default_factory=list)
    """Saelens-suite: the suite's SAE folders (or training run folders, the SAE in their sae/)."""
    model: str = ""
    """The checkpoint whose ffn_norm weights a transcoder's SAELens export folds in ("": its cfg.json's model)."""

    def __post_init__(self) -> None:
        check_choices(self)


def norm_weights(saes: list[TopKSae], model: str) -> dict[int, torch.Tensor]:
    """{layer: ffn_norm RMSNorm weight} for the transcoders on ffn_norm among `saes`, from the model each was
    trained on (`model`: another checkpoint of the same config and tokenizer); each checkpoint is loaded once."""
    from llama_3 import load_model  # the model is loaded only for transcoders

    loaded: dict[str, object] = {}
    weights: dict[int, torch.Tensor] = {}
    for sae in saes:
        hook = HookPoint.parse(sae.cfg.hook_point)
        if not (sae.cfg.is_transcoder and hook.kind == "ffn_norm"):
            continue
        where = str(sae.directory)
        path = sae.model_path(model or None, where)
        if not path:
            raise PipelineInputError(
                f"{where}: its cfg.json names no model to read the ffn_norm weight of; pass --model"
            )
        if path not in loaded:
            loaded[path] = load_model(path, device="cpu", dtype=torch.float32)
        lm = loaded[path]
        sae.check_model(lm.identity(), where)
        w = lm.model.layers[hook.layer].ffn_norm.weight.detach().float().clone()
        if hook.layer in weights and not torch.equal(weights[hook.layer], w):
            raise PipelineInputError(f"{where}: its model's {hook} weight is not the suite's other models'")
        weights[hook.layer] = w
    return weights


def sae_folder(path: str) -> str:
    """An SAE folder, or a training run folder's SAE (its sae/)."""
    run_sae = Path(path) / SAE_SUBDIR
    return str(run_sae) if not (Path(path) / SAE_CONFIG).is_file() and (run_sae / SAE_CONFIG).is_file() else path


def export_main(cfg: ExportConfig) -> Path:
    """Write `cfg.sae` in another tool's format to `cfg.out` (refused if it holds files already; sparsify:
    to cfg.out/layers.N; saelens-suite: cfg.saes to cfg.out/<id>/ and cfg.out/index.json). Returns the folder
    written."""
    out = Path(cfg.out)
    if not cfg.out:
        raise PipelineInputError("--out: the export's folder is required")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineInputError(f"--out {out}: exists and is not an empty folder")
    if cfg.format == "saelens-suite":
        if not cfg.saes:
            raise PipelineInputError("--saes: saelens-suite needs the suite's SAE folders")
        saes = [load_sae(sae_folder(path)) for path in cfg.saes]
        check_saelens_suite(saes)  # refusals before any model is loaded for the norm weights
        for entry in export_saelens_suite(saes, out, norm_weights(saes, cfg.model)):
            print(f"{out / entry['folder']}: {entry['source']} ({entry['architecture']}, {entry['hook_name']})")
        print(f"{out / 'index.json'}: {len(saes)} SAEs")
        return out
    sae = load_sae(cfg.sae)
    if cfg.format == "saelens":
        saelens_hooks(sae, cfg.unit_decoder)  # refusals before any model is loaded for the norm weight
        weights = norm_weights([sae], cfg.model)
        export_saelens(sae, out, unit_decoder=cfg.unit_decoder, norm_weight=next(iter(weights.values()), None))
    else:  # sparsify loads one folder per hookpoint, named by it
        out = out / sparsify_hookpoint(sae.cfg.hook_point)
        export_sparsify(sae, out)
    sparsity = f"k {sae.cfg.k}" if sae.cfg.activation == "topk" else sae.cfg.activation
    print(f"{out}: {cfg.sae} as {cfg.format} ({sae.cfg.n_latents} latents, {sparsity}, {sae.cfg.hook_point})")
    return out


@dataclass
class JumpReluConfig:
    sae: str = str(SAE_WEIGHTS_DIR)
    """The TopK SAE (or transcoder) to post-process."""
    data: str = ""
    """Preprocessing output of its input hook point to calibrate on ("": the one it was trained on)."""
    out: str = ""
    """Output SAE folder (new or empty)."""
    tokens: int = 65536
    """Calibration tokens (the first rows of the training split)."""


def jumprelu_main(cfg: JumpReluConfig) -> dict:
    """Post-process a TopK SAE to JumpReLU: per-latent thresholds that keep each latent's firing rate."""
    if not cfg.out:
        raise PipelineInputError("--out: the JumpReLU SAE's folder is required")
    record = convert(cfg.sae, cfg.data, cfg.out, cfg.tokens)
    print(
        f"{cfg.out}: JumpReLU from {cfg.sae} on {record['calibration_tokens']} tokens (TopK L0 "
        f"{record['mean_topk_l0']:.1f}; {record['latents_never_fired']} latents never fired, threshold inf)"
    )
    return record


COMMANDS = {"export": (export_main, ExportConfig), "jumprelu": (jumprelu_main, JumpReluConfig)}

if __name__ == "__main__":
    if sys.argv[1:2] not in [[c] for c in COMMANDS]:
        sys.exit(
            "usage: python sae.py export --format saelens|saelens-suite|sparsify [--sae DIR | --saes DIR...] "
            "--out DIR\n"
            "       python sae.py jumprelu --sae DIR [--data PREPROCESSED] --out DIR [--tokens N]"
        )
    main, config = COMMANDS[sys.argv[1]]
    run_main(main, parse_config(config, sys.argv[2:], description=__doc__))
