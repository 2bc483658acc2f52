"""The training stage's config (sae_training.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.core.cli import Runtime, check_choices
from pipeline.core.layout import PREPROCESSED_DIR, SAE_DIR
from pipeline.core.output_folder import config_request
from pipeline.sae.model import Normalize


@dataclass
class TrainConfig:
    data: Runtime[str] = str(PREPROCESSED_DIR)
    """Preprocessing output folder."""
    out: Runtime[str] = str(SAE_DIR)
    """Run folder (checkpoints, metrics, final SAE)."""
    target_data: str = ""
    """A transcoder's target: the preprocessing output of its output hook point (e.g. mlp_out.L for --data at
    ffn_norm.L), made from the same capture with the same seed, so its rows pair with --data's ("": an SAE)."""
    skip: bool = False
    """Transcoder with a linear skip connection from its input (Gemma Scope 2's skip-transcoders)."""
    topk_by_decoder_norm: bool = False
    """Llama Scope: TopK on pre-activation x decoder row norm, decoder norms left free."""
    k_start: int = 0
    """K-annealing (Llama Scope): k falls linearly from this to --k over --k-anneal-steps; -1: 4 x --k (at most
    n_latents), 0: off. It keeps latents alive (0.5% dead on the demo's held-out tokens, 13.5% without) but the
    dictionary explains worse (docs/pipeline.md), so it is off by default."""
    k_anneal_steps: int = 0
    """Steps of the K-annealing; -1: the first quarter of the run, 0: off."""
    suite: Runtime[str] = ""
    """A JSON list of SAEs to train in one pass over the data, each an object of these flags (data, out,
    expansion, k, target_data, ...) that override the command line's; one read of each batch feeds them all."""
    expansion: int = 8
    """n_latents = expansion * d_model (unless --n-latents)."""
    n_latents: int = 0
    """Dictionary size (0: expansion * d_model)."""
    k: int = 32
    """Active latents per token."""
    normalize: Normalize = "dataset"
    """Input normalisation: dataset, token, none."""
    batch_size: int = 1024
    """Global batch (tokens per optimizer step, all ranks together)."""
    epochs: int = 1
    """Passes over the training tokens."""
    lr: float = 0.0
    """Peak learning rate (0: 2e-3 / sqrt(n_latents / 2^14): OpenAI's 1/sqrt scaling at 10x its base, see
    docs/pipeline.md)."""
    beta1: float = 0.85
    """AdamW beta1."""
    beta2: float = 0.9999
    """AdamW beta2."""
    eps: float = 6.25e-10
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of the peak."""
    grad_clip: float = 0.0
    """Clip the global gradient norm (0: off)."""
    dead_tokens: int = 10_000_000
    """A latent silent for this many tokens is dead (OpenAI's and sparsify's 10M)."""
    k_aux: int = 0
    """Latents in the aux-k reconstruction (0: d_model / 2)."""
    aux_coef: float = 1 / 32
    """Aux-k loss coefficient."""
    val_every: Runtime[int] = 50
    """Validate every N steps."""
    checkpoint_every: Runtime[int] = 100
    """Checkpoint every N steps."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A batch with NaN/inf: skip (and count) or stop."""
    seed: int = 0
    """Initialisation and data-order seed."""
    device: Runtime[str] = "auto"
    """auto, cpu, cuda."""
    autocast: Literal["auto", "on", "off"] = "auto"
    """bf16 autocast for the SAE's matmuls: on, off, auto (on for CUDA and for CPUs with native bf16; weights,
    optimizer and decoder stay fp32)."""
    wandb: Runtime[Literal["online", "offline", "disabled", "auto"]] = "auto"
    """online, offline, disabled, auto (online with WANDB_API_KEY, else offline)."""
    wandb_project: Runtime[str] = "llama-sae"
    """W&B project."""
    eval_sentences: int = 128
    """Held-out sentences for the spliced CE/KL evaluation (0: skip)."""
    resume: Runtime[bool] = True
    """Continue from the run folder's checkpoint if there is one."""
    deterministic: Runtime[bool] = False
    """Deterministic kernels: repeated GPU runs give the same bits (slower; CPU runs are already)."""
    force: Runtime[bool] = False
    """Discard an existing run in --out."""

    def __post_init__(self) -> None:
        check_choices(self)


LATER_FIELDS = ("target_data", "skip", "topk_by_decoder_norm", "k_start", "k_anneal_steps")
"""Fields added after runs were made: at their defaults they stay out of a run's fingerprint (run_request), so a
run trained before them is still recognised and reused."""


def run_request(cfg: TrainConfig) -> dict:
    """The flags that decide a training run's output (its fingerprint's config part)."""
    defaults = TrainConfig()
    request = config_request(cfg)
    return {k: v for k, v in request.items() if not (k in LATER_FIELDS and v == getattr(defaults, k))}
