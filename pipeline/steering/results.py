"""The steering evaluation's output folder (written by steering_evaluation.py) and its one reader.

<dir>/results.json     the evaluation: per latent and method the sweep, the best factor and the held-out test;
                       the summary per method; every latent's output score (pipeline/steering/evaluation.py)
<dir>/manifest.json    kind "steering_eval": config, inputs (the SAE's sha256, top sentences, model), counts
<dir>/claude_judge/    the Claude judge's batch state when --judge claude
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import Fields, read_manifest

KIND = "steering_eval"
RESULTS_NAME = "results.json"
CLAUDE_JUDGE_DIR = "claude_judge"
REQUEST_NAME = "request.json"
"""Inside CLAUDE_JUDGE_DIR: which request the Claude batch state belongs to."""


@dataclass(frozen=True)
class SteeringEvalOutput:
    """A finished steering evaluation: its manifest's fields and results.json."""

    directory: Path
    sae_sha256: str
    """The SAE it evaluated."""
    hook_point: str
    summary: dict
    """Per method (sae, diffmean, prompt, unsteered): harmonic, on_concept, fluency, loss_ratio means."""
    latents: list[dict]
    output_scores: dict[int, float]
    """Every scored latent's output score: how much its decoder row raises the next-token probability of
    its meaning's rare key words (latents whose meaning names none have no score)."""
    results: dict
    """results.json whole."""

    @staticmethod
    def open(directory: str | Path) -> "SteeringEvalOutput":
        directory = Path(directory)
        m = Fields(directory, read_manifest(directory, KIND))
        path = directory / RESULTS_NAME
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PipelineInputError(f"{path}: cannot be read ({e})") from None
        r = Fields(directory, doc, RESULTS_NAME)
        return SteeringEvalOutput(
            directory=directory,
            sae_sha256=m.get("inputs.sae_sha256", str),
            hook_point=r.get("hook_point", str),
            summary=r.get("summary", dict),
            latents=r.get("latents", list),
            output_scores={int(k): float(v) for k, v in r.get("output_scores", dict).items()},
            results=doc,
        )

    def recommended(self) -> dict[int, float]:
        """`add` strength at the best factor of the sweep, for the latents the sweep ran on."""
        return {
            r["latent"]: r["methods"]["sae"]["add_strength"]
            for r in self.latents
            if r["methods"]["sae"].get("add_strength")
        }

    def headline(self) -> dict[int, float]:
        """Harmonic score on the held-out instructions at that strength."""
        return {r["latent"]: r["methods"]["sae"]["test"]["harmonic"] for r in self.latents}


def open_for_sae(directory: str | Path, sae_sha256: str) -> SteeringEvalOutput | None:
    """The finished evaluation in `directory` when it evaluated this SAE; None when there is none (or it is
    unreadable, or of another SAE): the steering page then works without its scores."""
    try:
        out = SteeringEvalOutput.open(directory)
    except PipelineInputError:
        return None
    return out if out.sae_sha256 == sae_sha256 else None
