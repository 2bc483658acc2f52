"""The capture stage's config (capture_activations.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.cli import Dtype, Runtime, StorageDtype, check_choices
from pipeline.core.layout import ACTIVATIONS_DIR, SENTENCES_DIR
from pipeline.core.tokenization import DEFAULT_MAX_TOKENS


@dataclass
class CaptureConfig:
    sentences: str = str(SENTENCES_DIR)
    """Sentence dataset folder."""
    out: Runtime[str] = str(ACTIVATIONS_DIR)
    """Output folder."""
    model: str | None = None
    """Meta dir, HF dir or GGUF file; default: embedded SmolLM2-135M-Instruct."""
    hook_points: list[str] = field(default_factory=list)
    """Hook points, e.g. resid_pre.25 attn_norm.25 (default: resid_pre at 5/6 depth)."""
    max_tokens: int = DEFAULT_MAX_TOKENS
    """Tokens kept per sentence (longer ones are truncated and counted)."""
    add_bos: bool = False
    """Prepend BOS (its own activation is never stored)."""
    max_sentences: int = 0
    """Capture only the first N sentences (0: all)."""
    device: Runtime[str] = "auto"
    """auto, cpu, cuda (torchrun: each rank its local GPU)."""
    model_dtype: Dtype = "auto"
    """auto (bf16 on GPUs and bf16-capable CPUs, else fp32), float32, bfloat16."""
    storage_dtype: StorageDtype = "bfloat16"
    """Dtype of stored activations: bfloat16, float16, float32."""
    shard_tokens: int = 131_072
    """Tokens per shard."""
    max_batch_tokens: int = 0
    """Padded tokens per forward (0: 2,048 on CPU, where that runs fastest; 8,192 on CUDA)."""
    max_batch_size: int = 256
    """Sentences per forward."""
    force: Runtime[bool] = False
    """Discard an existing capture with other settings."""

    def __post_init__(self) -> None:
        check_choices(self)
