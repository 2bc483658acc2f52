"""The top-sentences stage's config (capture_top_activating_sentences.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.cli import Dtype, check_choices
from pipeline.core.layout import SAE_WEIGHTS_DIR, SENTENCES_DIR, TOP_SENTENCES_DIR
from pipeline.top_sentences.sources import Source


@dataclass
class TopSentencesConfig:
    sae: str = field(default=str(SAE_WEIGHTS_DIR), metadata={"help": "SAE folder (sae.safetensors + cfg.json)"})
    sentences: str = field(default=str(SENTENCES_DIR), metadata={"help": "sentence dataset folder"})
    out: str = field(default=str(TOP_SENTENCES_DIR), metadata={"fingerprint": False, "help": "output folder"})
    model: str | None = field(
        default=None,
        metadata={"help": "the SAE's model (Meta dir, HF dir or GGUF); default: the path in the SAE's cfg.json"},
    )
    hook_point: str | None = field(default=None, metadata={"help": "must match the SAE's (default: the SAE's)"})
    source: Source = field(
        default="auto",
        metadata={
            "help": "activations from: auto (the capture where it holds the sentences as the SAE saw them, the "
            "model for the rest), capture (refuse otherwise), model (always run it)"
        },
    )
    capture: str | None = field(
        default=None, metadata={"help": "capture folder to read (default: the one the SAE was trained from)"}
    )
    top_n: int = field(default=50, metadata={"help": "sentences kept per latent and aggregation"})
    non_activating: int = field(default=20, metadata={"help": "sentences sampled per latent where it never fires"})
    max_sentences: int = field(
        default=-1, metadata={"help": "first N sentences (-1: those the SAE's capture covered; 0: all)"}
    )
    output_tokens: int = field(default=10, metadata={"help": "promoted / suppressed output tokens listed per latent"})
    device: str = field(default="auto", metadata={"fingerprint": False, "help": "auto, cpu, cuda"})
    model_dtype: Dtype = field(
        default="auto",
        metadata={"help": "auto (as the capture: bf16 on GPUs and bf16-capable CPUs, else fp32), float32, bfloat16"},
    )
    max_batch_tokens: int = field(
        default=0,
        metadata={"help": "padded tokens per forward (0: 2,048 on CPU, where that runs fastest; 8,192 on CUDA)"},
    )
    deterministic: bool = field(
        default=False,
        metadata={
            "fingerprint": False,
            "help": "deterministic kernels: repeated GPU runs give the same bits (slower; CPU runs are already)",
        },
    )
    force: bool = field(default=False, metadata={"fingerprint": False, "help": "overwrite an existing output"})

    def __post_init__(self) -> None:
        check_choices(self)
