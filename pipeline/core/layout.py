"""The run-folder layout, in one place: where each stage writes by default (everything under one runs/
folder, git-ignored) and the meanings folder beside it. Stage configs default to these paths; the report,
the pipeline runner and the summary screen find outputs through `RunLayout`. File names inside each
output belong to that output's format module (e.g. pipeline/capture/activations.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BROWSER_NAME = "browser"
"""The feature browser's folder inside the interpretation folder (the parse stage writes it)."""


@dataclass(frozen=True)
class RunLayout:
    """Every stage output of one run, under `runs`; meanings (the user's interpretation results) beside it."""

    runs: Path = Path("runs")
    meanings: Path = Path("latent_index_meaning")

    @property
    def sentences(self) -> Path:
        return self.runs / "sentences"

    @property
    def activations(self) -> Path:
        return self.runs / "activations"

    @property
    def preprocessed(self) -> Path:
        return self.runs / "preprocessed"

    @property
    def sae_run(self) -> Path:
        """The training run folder (checkpoint, metrics, manifest)."""
        return self.runs / "sae"

    @property
    def sae(self) -> Path:
        """The trained SAE itself, inside the run folder: what --sae takes."""
        return self.sae_run / "sae"

    @property
    def top_sentences(self) -> Path:
        return self.runs / "top_sentences"

    @property
    def interpretation(self) -> Path:
        return self.runs / "interpretation"

    @property
    def browser(self) -> Path:
        """The feature browser, written by the interpretation parse stage into its folder."""
        return self.interpretation / BROWSER_NAME

    @property
    def steering_eval(self) -> Path:
        return self.runs / "steering_eval"

    @property
    def report(self) -> Path:
        return self.runs / "report"

    @property
    def pipeline_record(self) -> Path:
        """run_pipeline.py's record of each stage (timings, memory, outcome)."""
        return self.runs / "pipeline.json"


DEFAULT = RunLayout()
RUNS_DIR = DEFAULT.runs
SENTENCES_DIR = DEFAULT.sentences
ACTIVATIONS_DIR = DEFAULT.activations
PREPROCESSED_DIR = DEFAULT.preprocessed
SAE_DIR = DEFAULT.sae_run
SAE_WEIGHTS_DIR = DEFAULT.sae
TOP_SENTENCES_DIR = DEFAULT.top_sentences
INTERPRETATION_DIR = DEFAULT.interpretation
BROWSER_DIR = DEFAULT.browser
STEERING_EVAL_DIR = DEFAULT.steering_eval
REPORT_DIR = DEFAULT.report
MEANINGS_DIR = DEFAULT.meanings
