"""The SAE, for users: `from sae import TopKSae, SaeConfig, load_sae` (pipeline/sae/model.py and formats.py),
and the export command.

Usage (export):
    python sae.py export --format sparsify --out exports     # -> exports/layers.24 for a resid_pre.25 SAE
    python sae.py export --format saelens --sae runs/sae/sae --out exports/saelens [--unit-decoder]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llama_3.errors import PipelineInputError
from pipeline.core.cli import check_choices, parse_config, run_main
from pipeline.core.layout import SAE_WEIGHTS_DIR
from pipeline.sae.formats import (
    SAELENS_FORMAT_VERSION,
    TRANSFORMERLENS_HOOKS,
    export_saelens,
    export_sparsify,
    load_sae,
    sae_sha256,
    sparsify_hookpoint,
)
from pipeline.sae.model import ENCODER_INIT_NORM, SaeConfig, SaeOutput, TopKSae, sparse_decode

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
    "export_sparsify",
    "load_sae",
    "sae_sha256",
    "sparse_decode",
    "sparsify_hookpoint",
]

ExportFormat = Literal["saelens", "sparsify"]


@dataclass
class ExportConfig:
    sae: str = str(SAE_WEIGHTS_DIR)
    """SAE folder (ours, or sparsify's layout)."""
    format: ExportFormat = "saelens"
    """Saelens or sparsify."""
    out: str = ""
    """Output folder (new or empty)."""
    unit_decoder: bool = False
    """Saelens: unit decoder rows, rescale_acts_by_decoder_norm (for sae-dashboard)."""

    def __post_init__(self) -> None:
        check_choices(self)


def export_main(cfg: ExportConfig) -> Path:
    """Write `cfg.sae` in another tool's format to `cfg.out` (refused if it holds files already; sparsify:
    to cfg.out/layers.N). Returns the folder written."""
    out = Path(cfg.out)
    if not cfg.out:
        raise PipelineInputError("--out: the export's folder is required")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineInputError(f"--out {out}: exists and is not an empty folder")
    sae = load_sae(cfg.sae)
    if cfg.format == "saelens":
        export_saelens(sae, out, unit_decoder=cfg.unit_decoder)
    else:  # sparsify loads one folder per hookpoint, named by it
        out = out / sparsify_hookpoint(sae.cfg.hook_point)
        export_sparsify(sae, out)
    sparsity = f"k {sae.cfg.k}" if sae.cfg.activation == "topk" else sae.cfg.activation
    print(f"{out}: {cfg.sae} as {cfg.format} ({sae.cfg.n_latents} latents, {sparsity}, {sae.cfg.hook_point})")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] != ["export"]:
        sys.exit("usage: python sae.py export --format saelens|sparsify [--sae DIR] --out DIR")
    run_main(export_main, parse_config(ExportConfig, sys.argv[2:], description=__doc__))
