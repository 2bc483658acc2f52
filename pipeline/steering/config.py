"""The steering evaluation's config (steering_evaluation.py's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.cli import Dtype, Runtime, check_choices
from pipeline.core.layout import MEANINGS_DIR, SAE_WEIGHTS_DIR, STEERING_EVAL_DIR, TOP_SENTENCES_DIR
from pipeline.interpret.batches import DEFAULT_MODEL
from pipeline.steering.evaluation import SELECT_INSTRUCTIONS, TEST_INSTRUCTIONS

Judge = Literal["offline", "claude"]


@dataclass
class SteeringEvalConfig:
    sae: str = str(SAE_WEIGHTS_DIR)
    """SAE folder."""
    top_sentences: str = str(TOP_SENTENCES_DIR)
    """Top-sentences output (examples for DiffMean and the judge)."""
    meanings: Runtime[str] = str(MEANINGS_DIR)
    """Folder of latent meanings."""
    out: Runtime[str] = str(STEERING_EVAL_DIR)
    """Output folder."""
    model: str | None = None
    """Default: the SAE's model."""
    latents: list[int] = field(default_factory=list)
    """Latents to evaluate (default: the --n-candidates with the best output score)."""
    n_candidates: int = 20
    """How many of the latents with the best output score."""
    factors: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])
    """Strengths swept, as multiples of the stream's mean norm at the hook."""
    sae_mode: Literal["add", "clamp"] = "add"
    """SAE steering: add the decoder row, or clamp the latent's activation (the same push, in SAE units)."""
    keep_error: bool = True
    """With the SAE's error term (off: the model runs on the SAE's reconstruction while steered)."""
    steer_on: Literal["all", "prompt", "generated"] = "all"
    """Positions steered: every one, the prompt only, or only the generated tokens."""
    output_factor: float = 0.2
    """Strength of the output score's steering."""
    select_instructions: list[str] = field(default_factory=lambda: list(SELECT_INSTRUCTIONS))
    """Chat instructions the sweep runs on."""
    test_instructions: list[str] = field(default_factory=lambda: list(TEST_INSTRUCTIONS))
    """Held-out chat instructions the best strengths are reported on."""
    max_new_tokens: int = 32
    """Tokens per continuation."""
    temperature: float = 0.0
    """0 = greedy."""
    seed: int = 0
    """Sampling seed."""
    judge: Judge = "offline"
    """Offline (MiniLM + the clean model), or claude as well (needs ANTHROPIC_API_KEY)."""
    claude_model: str = DEFAULT_MODEL
    """The Claude judge's model."""
    poll_seconds: Runtime[float] = 60.0
    """Claude batch polling interval."""
    timeout_minutes: Runtime[float] = 0.0
    """Stop waiting for Claude batches after this (0: never)."""
    base_url: Runtime[str | None] = None
    """API base URL (default: the SDK's; e.g. a test server)."""
    batch_rows: Runtime[int] = 256
    """Continuations generated per batch; greedy results do not depend on it."""
    device: Runtime[str] = "auto"
    """auto, cpu, cuda."""
    dtype: Dtype = "auto"
    """auto, float32, bfloat16, float16."""
    force: Runtime[bool] = False
    """Recompute even if the output matches."""

    def __post_init__(self) -> None:
        check_choices(self)
