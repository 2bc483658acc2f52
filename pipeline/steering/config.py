"""The steering evaluation's config (steering_evaluation.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.cli import Dtype, check_choices
from pipeline.core.layout import MEANINGS_DIR, SAE_WEIGHTS_DIR, STEERING_EVAL_DIR, TOP_SENTENCES_DIR
from pipeline.interpret.batches import DEFAULT_MODEL
from pipeline.steering.evaluation import SELECT_INSTRUCTIONS, TEST_INSTRUCTIONS

Judge = Literal["offline", "claude"]


@dataclass
class SteeringEvalConfig:
    sae: str = field(default=str(SAE_WEIGHTS_DIR), metadata={"help": "SAE folder"})
    top_sentences: str = field(
        default=str(TOP_SENTENCES_DIR), metadata={"help": "top-sentences output (examples for DiffMean and the judge)"}
    )
    meanings: str = field(
        default=str(MEANINGS_DIR), metadata={"fingerprint": False, "help": "folder of latent meanings"}
    )
    out: str = field(default=str(STEERING_EVAL_DIR), metadata={"fingerprint": False, "help": "output folder"})
    model: str | None = field(default=None, metadata={"help": "default: the SAE's model"})
    latents: list[int] = field(
        default_factory=list,
        metadata={"help": "latents to evaluate (default: the --n-candidates with the best output score)"},
    )
    n_candidates: int = field(default=20, metadata={"help": "how many of the latents with the best output score"})
    factors: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.4],
        metadata={"help": "strengths swept, as multiples of the stream's mean norm at the hook"},
    )
    output_factor: float = field(default=0.2, metadata={"help": "strength of the output score's steering"})
    select_instructions: list[str] = field(
        default_factory=lambda: list(SELECT_INSTRUCTIONS), metadata={"help": "chat instructions the sweep runs on"}
    )
    test_instructions: list[str] = field(
        default_factory=lambda: list(TEST_INSTRUCTIONS),
        metadata={"help": "held-out chat instructions the best strengths are reported on"},
    )
    max_new_tokens: int = field(default=32, metadata={"help": "tokens per continuation"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    judge: Judge = field(
        default="offline",
        metadata={"help": "offline (MiniLM + the clean model), or claude as well (needs ANTHROPIC_API_KEY)"},
    )
    claude_model: str = field(default=DEFAULT_MODEL, metadata={"help": "the Claude judge's model"})
    poll_seconds: float = field(default=60.0, metadata={"fingerprint": False, "help": "Claude batch polling interval"})
    timeout_minutes: float = field(
        default=0.0, metadata={"fingerprint": False, "help": "stop waiting for Claude batches after this (0: never)"}
    )
    base_url: str | None = field(
        default=None, metadata={"fingerprint": False, "help": "API base URL (default: the SDK's; e.g. a test server)"}
    )
    batch_rows: int = field(
        default=256,
        metadata={
            "fingerprint": False,
            "help": "continuations generated per batch; greedy results do not depend on it",
        },
    )
    device: str = field(default="auto", metadata={"fingerprint": False, "help": "auto, cpu, cuda"})
    dtype: Dtype = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    force: bool = field(default=False, metadata={"fingerprint": False, "help": "recompute even if the output matches"})

    def __post_init__(self) -> None:
        check_choices(self)
