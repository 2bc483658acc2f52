"""The interpretation stages' configs: send, retrieve and parse (the interpret_top_sentences_*.py scripts' flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.cli import Runtime, check_choices
from pipeline.core.layout import INTERPRETATION_DIR, MEANINGS_DIR, TOP_SENTENCES_DIR
from pipeline.interpret.batches import (
    DEFAULT_MODEL,
    Task,
)
from pipeline.interpret.explainers import TestSet
from pipeline.top_sentences.tables import Aggregation


@dataclass
class SendConfig:
    top_sentences: str = str(TOP_SENTENCES_DIR)
    """Top-sentences output folder."""
    out: str = str(INTERPRETATION_DIR)
    """Interpretation folder (state, results)."""
    task: Task = "explain"
    """Explain (one meaning per latent) or detect (Claude judges the meanings)."""
    aggregation: Aggregation = "max"
    """Which top sentences to show: mean, max, last."""
    sentences_per_latent: int = 20
    """Top sentences per explain request (then half of the latent's random activating sample)."""
    min_sentences: int = 5
    """Skip latents with fewer top sentences."""
    latents: list[int] = field(default_factory=list)
    """Only these latents."""
    max_latents: int = 0
    """At most this many latents, most frequent first (0: all)."""
    model: str = DEFAULT_MODEL
    """Claude model."""
    max_tokens: int = 1024
    """Max output tokens per request."""
    expected_output_tokens: int = 450
    """Output tokens per answer, for the cost estimate."""
    offline: bool = False
    """Use the offline explainer even when a key is set."""
    dry_run: bool = False
    """Write the requests to <out>/<task>/dry_run.jsonl and send nothing."""
    base_url: str | None = None
    """API base URL (default: the SDK's; e.g. a local test server)."""
    max_retries: int = 5
    """SDK retries with backoff on 429 / 5xx."""
    meanings: str = str(MEANINGS_DIR)
    """Detect task: the meanings to judge."""
    detect_activating: int = 5
    """Detect task: held-out activating sentences per request (every activation level)."""
    detect_silent: int = 3
    """Detect task: random silent sentences per request."""
    detect_hard: int = 2
    """Detect task: hard negatives per request (silent sentences holding the latent's key token)."""
    force: bool = False
    """Discard this task's state and results (and any batches in flight) and start over."""

    def __post_init__(self) -> None:
        check_choices(self)

    def detect_test(self) -> TestSet:
        return TestSet(self.detect_activating, self.detect_silent, self.detect_hard, self.sentences_per_latent)


@dataclass
class RetrieveConfig:
    out: str = str(INTERPRETATION_DIR)
    """Interpretation folder (state, results)."""
    task: Task = "explain"
    """Explain or detect."""
    wait: bool = False
    """Poll until every batch has ended."""
    poll_seconds: float = 60.0
    """Seconds between polls with --wait."""
    timeout_minutes: float = 0.0
    """Give up waiting after this long (0: never)."""
    base_url: str | None = None
    """API base URL (default: the SDK's; e.g. a local test server)."""
    max_retries: int = 5
    """SDK retries with backoff on 429 / 5xx."""

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class ParseConfig:
    top_sentences: str = str(TOP_SENTENCES_DIR)
    """Top-sentences output folder."""
    out: str = str(INTERPRETATION_DIR)
    """Interpretation folder (state, results)."""
    meanings: str = str(MEANINGS_DIR)
    """Where the meaning file goes."""
    run_name: str = ""
    """Meaning file name (default: <sae sha256[:8]>-<explainer>)."""
    judge: Literal["minilm", "none"] = "minilm"
    """Offline detection judge: minilm or none."""
    second_judge: Literal["e5", "none"] = "e5"
    """Independent second judge: e5 (multilingual-e5-small, another model family than MiniLM) or none."""
    second_judge_latents: int = 25
    """Latents (a fixed random sample) the second judge scores: up to 50 sentences each, ~50 sentences/s on 2
    cores (25: ~30 s of the demo's parse stage on 2 AVX2 cores; 50 took ~60, a third of the stage)."""
    aggregation: Aggregation = "max"
    """Top sentences the judge draws activating examples from."""
    judge_activating: int = 20
    """Held-out activating sentences per latent: the random sample's half the explainer did not see."""
    judge_silent: int = 20
    """Random silent sentences per latent."""
    judge_hard: int = 10
    """Hard negatives per latent: silent sentences holding its key token."""
    skip_top: int = 20
    """The explainer saw the top N (send's --sentences-per-latent): none of them is a test sentence."""
    browser: Runtime[bool] = True
    """Write the feature browser to <out>/browser/."""
    browser_sentences: Runtime[int] = 10
    """Sentences per aggregation on each latent page."""

    def __post_init__(self) -> None:
        check_choices(self)

    def test_set(self) -> TestSet:
        return TestSet(self.judge_activating, self.judge_silent, self.judge_hard, self.skip_top)
