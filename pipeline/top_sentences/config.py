"""The top-sentences stage's config (capture_top_activating_sentences.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.cli import Dtype, Runtime, check_choices
from pipeline.core.layout import SAE_WEIGHTS_DIR, SENTENCES_DIR, TOP_SENTENCES_DIR
from pipeline.top_sentences.sources import Source


@dataclass
class TopSentencesConfig:
    sae: str = str(SAE_WEIGHTS_DIR)
    """SAE folder (sae.safetensors + cfg.json)."""
    sentences: str = str(SENTENCES_DIR)
    """Sentence dataset folder."""
    out: Runtime[str] = str(TOP_SENTENCES_DIR)
    """Output folder."""
    model: str | None = None
    """The SAE's model (Meta dir, HF dir or GGUF); default: the path in the SAE's cfg.json."""
    hook_point: str | None = None
    """Must match the SAE's (default: the SAE's)."""
    source: Source = "auto"
    """Activations from: auto (the capture where it holds the sentences as the SAE saw them, the model for the rest),
    capture (refuse otherwise), model (always run it)."""
    capture: str | None = None
    """Capture folder to read (default: the one the SAE was trained from)."""
    top_n: int = 50
    """Sentences kept per latent and aggregation."""
    non_activating: int = 20
    """Sentences sampled per latent where it never fires."""
    hard_negatives: int = 10
    """Sentences sampled per latent where it never fires though they hold its key token (the judges' hard negatives)."""
    sampled: int = 40
    """Sentences sampled per latent where it fires, at random: examples from every activation level."""
    max_sentences: int = -1
    """First N sentences (-1: those the SAE's capture covered; 0: all)."""
    output_tokens: int = 10
    """Promoted / suppressed output tokens listed per latent."""
    device: Runtime[str] = "auto"
    """auto, cpu, cuda."""
    model_dtype: Dtype = "auto"
    """auto (as the capture: bf16 on GPUs and bf16-capable CPUs, else fp32), float32, bfloat16."""
    max_batch_tokens: int = 0
    """Padded tokens per forward (0: 2,048 on CPU, where that runs fastest; 8,192 on CUDA)."""
    deterministic: Runtime[bool] = False
    """Deterministic kernels: repeated GPU runs give the same bits (slower; CPU runs are already)."""
    force: Runtime[bool] = False
    """Overwrite an existing output."""

    def __post_init__(self) -> None:
        check_choices(self)
