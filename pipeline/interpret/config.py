"""The interpretation stages' configs: send, retrieve and parse (the interpret_top_sentences_*.py scripts' flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.cli import check_choices
from pipeline.core.layout import INTERPRETATION_DIR, MEANINGS_DIR, TOP_SENTENCES_DIR
from pipeline.interpret.batches import (
    DEFAULT_MODEL,
    Task,
)
from pipeline.top_sentences.tables import Aggregation


@dataclass
class SendConfig:
    top_sentences: str = field(default=str(TOP_SENTENCES_DIR), metadata={"help": "top-sentences output folder"})
    out: str = field(default=str(INTERPRETATION_DIR), metadata={"help": "interpretation folder (state, results)"})
    task: Task = field(
        default="explain", metadata={"help": "explain (one meaning per latent) or detect (Claude judges the meanings)"}
    )
    aggregation: Aggregation = field(default="max", metadata={"help": "which top sentences to show: mean, max, last"})
    sentences_per_latent: int = field(default=20, metadata={"help": "top sentences per explain request"})
    min_sentences: int = field(default=5, metadata={"help": "skip latents with fewer top sentences"})
    latents: list[int] = field(default_factory=list, metadata={"help": "only these latents"})
    max_latents: int = field(default=0, metadata={"help": "at most this many latents, most frequent first (0: all)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Claude model"})
    max_tokens: int = field(default=1024, metadata={"help": "max output tokens per request"})
    expected_output_tokens: int = field(
        default=450, metadata={"help": "output tokens per answer, for the cost estimate"}
    )
    offline: bool = field(default=False, metadata={"help": "use the offline explainer even when a key is set"})
    dry_run: bool = field(
        default=False, metadata={"help": "write the requests to <out>/<task>/dry_run.jsonl and send nothing"}
    )
    base_url: str | None = field(
        default=None, metadata={"help": "API base URL (default: the SDK's; e.g. a local test server)"}
    )
    max_retries: int = field(default=5, metadata={"help": "SDK retries with backoff on 429 / 5xx"})
    meanings: str = field(default=str(MEANINGS_DIR), metadata={"help": "detect task: the meanings to judge"})
    detect_activating: int = field(default=5, metadata={"help": "detect task: activating sentences per request"})
    detect_silent: int = field(default=5, metadata={"help": "detect task: silent sentences per request"})
    force: bool = field(
        default=False,
        metadata={"help": "discard this task's state and results (and any batches in flight) and start over"},
    )

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class RetrieveConfig:
    out: str = field(default=str(INTERPRETATION_DIR), metadata={"help": "interpretation folder (state, results)"})
    task: Task = field(default="explain", metadata={"help": "explain or detect"})
    wait: bool = field(default=False, metadata={"help": "poll until every batch has ended"})
    poll_seconds: float = field(default=60.0, metadata={"help": "seconds between polls with --wait"})
    timeout_minutes: float = field(default=0.0, metadata={"help": "give up waiting after this long (0: never)"})
    base_url: str | None = field(
        default=None, metadata={"help": "API base URL (default: the SDK's; e.g. a local test server)"}
    )
    max_retries: int = field(default=5, metadata={"help": "SDK retries with backoff on 429 / 5xx"})

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class ParseConfig:
    top_sentences: str = field(default=str(TOP_SENTENCES_DIR), metadata={"help": "top-sentences output folder"})
    out: str = field(default=str(INTERPRETATION_DIR), metadata={"help": "interpretation folder (state, results)"})
    meanings: str = field(default=str(MEANINGS_DIR), metadata={"help": "where the meaning file goes"})
    run_name: str = field(default="", metadata={"help": "meaning file name (default: <sae sha256[:8]>-<explainer>)"})
    judge: Literal["minilm", "none"] = field(
        default="minilm", metadata={"help": "offline detection judge: minilm or none"}
    )
    aggregation: Aggregation = field(
        default="max", metadata={"help": "top sentences the judge draws activating examples from"}
    )
    judge_activating: int = field(default=10, metadata={"help": "held-out activating sentences per latent"})
    judge_silent: int = field(default=20, metadata={"help": "silent sentences per latent"})
    skip_top: int = field(default=20, metadata={"help": "activating examples start after the explainer's top N"})
    browser: bool = field(
        default=True, metadata={"fingerprint": False, "help": "write the feature browser to <out>/browser/"}
    )
    browser_sentences: int = field(
        default=10, metadata={"fingerprint": False, "help": "sentences per aggregation on each latent page"}
    )

    def __post_init__(self) -> None:
        check_choices(self)
