"""The training stage's config (sae_training.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.cli import check_choices
from pipeline.core.layout import PREPROCESSED_DIR, SAE_DIR
from pipeline.sae.model import Normalize


@dataclass
class TrainConfig:
    data: str = field(
        default=str(PREPROCESSED_DIR), metadata={"fingerprint": False, "help": "preprocessing output folder"}
    )
    out: str = field(
        default=str(SAE_DIR), metadata={"fingerprint": False, "help": "run folder (checkpoints, metrics, final SAE)"}
    )
    expansion: int = field(default=8, metadata={"help": "n_latents = expansion * d_model (unless --n-latents)"})
    n_latents: int = field(default=0, metadata={"help": "dictionary size (0: expansion * d_model)"})
    k: int = field(default=32, metadata={"help": "active latents per token"})
    normalize: Normalize = field(default="dataset", metadata={"help": "input normalisation: dataset, token, none"})
    batch_size: int = field(
        default=1024, metadata={"help": "global batch (tokens per optimizer step, all ranks together)"}
    )
    epochs: int = field(default=1, metadata={"help": "passes over the training tokens"})
    lr: float = field(
        default=0.0,
        metadata={
            "help": "peak learning rate (0: 2e-3 / sqrt(n_latents / 2^14): OpenAI's "
            "1/sqrt scaling at 10x its base, see the README)"
        },
    )
    beta1: float = field(default=0.85, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.9999, metadata={"help": "AdamW beta2"})
    eps: float = field(default=6.25e-10, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this fraction of the peak"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the global gradient norm (0: off)"})
    dead_tokens: int = field(
        default=10_000_000,
        metadata={"help": "a latent silent for this many tokens is dead (OpenAI's and sparsify's 10M)"},
    )
    k_aux: int = field(default=0, metadata={"help": "latents in the aux-k reconstruction (0: d_model / 2)"})
    aux_coef: float = field(default=1 / 32, metadata={"help": "aux-k loss coefficient"})
    val_every: int = field(default=50, metadata={"fingerprint": False, "help": "validate every N steps"})
    checkpoint_every: int = field(default=100, metadata={"fingerprint": False, "help": "checkpoint every N steps"})
    nonfinite: Literal["skip", "stop"] = field(
        default="skip", metadata={"help": "a batch with NaN/inf: skip (and count) or stop"}
    )
    seed: int = field(default=0, metadata={"help": "initialisation and data-order seed"})
    device: str = field(default="auto", metadata={"fingerprint": False, "help": "auto, cpu, cuda"})
    autocast: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "bf16 autocast for the SAE's matmuls: on, off, auto (on for CUDA and "
            "for CPUs with native bf16; weights, optimizer and decoder stay fp32)"
        },
    )
    wandb: Literal["online", "offline", "disabled", "auto"] = field(
        default="auto",
        metadata={
            "fingerprint": False,
            "help": "online, offline, disabled, auto (online with WANDB_API_KEY, else offline)",
        },
    )
    wandb_project: str = field(default="llama-sae", metadata={"fingerprint": False, "help": "W&B project"})
    eval_sentences: int = field(
        default=128, metadata={"help": "held-out sentences for the spliced CE/KL evaluation (0: skip)"}
    )
    resume: bool = field(
        default=True,
        metadata={"fingerprint": False, "help": "continue from the run folder's checkpoint if there is one"},
    )
    deterministic: bool = field(
        default=False,
        metadata={
            "fingerprint": False,
            "help": "deterministic kernels: repeated GPU runs give the same bits (slower; CPU runs are already)",
        },
    )
    force: bool = field(default=False, metadata={"fingerprint": False, "help": "discard an existing run in --out"})

    def __post_init__(self) -> None:
        check_choices(self)
