"""The capture stage's config (capture_activations.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.cli import Dtype, StorageDtype, check_choices
from pipeline.core.layout import ACTIVATIONS_DIR, SENTENCES_DIR
from pipeline.core.tokenization import DEFAULT_MAX_TOKENS


@dataclass
class CaptureConfig:
    sentences: str = field(default=str(SENTENCES_DIR), metadata={"help": "sentence dataset folder"})
    out: str = field(default=str(ACTIVATIONS_DIR), metadata={"fingerprint": False, "help": "output folder"})
    model: str | None = field(
        default=None, metadata={"help": "Meta dir, HF dir or GGUF file; default: embedded SmolLM2-135M-Instruct"}
    )
    hook_points: list[str] = field(
        default_factory=list,
        metadata={"help": "hook points, e.g. resid_pre.25 attn_norm.25 (default: resid_pre at 5/6 depth)"},
    )
    max_tokens: int = field(
        default=DEFAULT_MAX_TOKENS,
        metadata={"help": "tokens kept per sentence (longer ones are truncated and counted)"},
    )
    add_bos: bool = field(default=False, metadata={"help": "prepend BOS (its own activation is never stored)"})
    max_sentences: int = field(default=0, metadata={"help": "capture only the first N sentences (0: all)"})
    device: str = field(
        default="auto", metadata={"fingerprint": False, "help": "auto, cpu, cuda (torchrun: each rank its local GPU)"}
    )
    model_dtype: Dtype = field(
        default="auto", metadata={"help": "auto (bf16 on GPUs and bf16-capable CPUs, else fp32), float32, bfloat16"}
    )
    storage_dtype: StorageDtype = field(
        default="bfloat16", metadata={"help": "dtype of stored activations: bfloat16, float16, float32"}
    )
    shard_tokens: int = field(default=131_072, metadata={"help": "tokens per shard"})
    max_batch_tokens: int = field(
        default=0,
        metadata={"help": "padded tokens per forward (0: 2,048 on CPU, where that runs fastest; 8,192 on CUDA)"},
    )
    max_batch_size: int = field(default=256, metadata={"help": "sentences per forward"})
    force: bool = field(
        default=False, metadata={"fingerprint": False, "help": "discard an existing capture with other settings"}
    )

    def __post_init__(self) -> None:
        check_choices(self)
