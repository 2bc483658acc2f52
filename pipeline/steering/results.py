"""The steering evaluation's output folder (written by steering_evaluation.py) and its one reader.

<dir>/results.json     the evaluation (pipeline/steering/evaluation.py): every continuation with its judge's scores
                       ("rows", read as SteeringRow); per latent and method the sweep, the best factor and the
                       held-out test; the summary per method; every latent's output score
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
class SteeringRow:
    """One judged continuation."""

    phase: str
    """"select" (the strength sweep's instructions) or "test" (held out)."""
    instruction: str
    method: str
    """"none" (unsteered), "sae", "diffmean" or "prompt"."""
    latent: int
    """The latent whose concept it is judged for (an unsteered text is judged for every latent)."""
    factor: float | None
    """Strength as a multiple of the stream's mean norm (steered methods)."""
    text: str
    changed: bool | None
    """Steered text differs from the unsteered text of its instruction."""
    concept: int
    instruction_score: int
    fluency: int
    harmonic: float
    scores: dict
    """Every number the judge stored (mentions, similarity, loss, loss_ratio, loop, activation, claude, ...)."""

    @property
    def on_concept(self) -> bool:
        return self.concept == 2


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
    rows: list[SteeringRow]
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
        if "rows" not in doc:  # an older evaluation's results (one example per latent, 3-row means)
            raise PipelineInputError(f"{path}: written by an older steering evaluation; run it again")
        instructions = r.get("instructions", list)
        try:
            rows = [
                SteeringRow(
                    phase=row["phase"],
                    instruction=instructions[row["prompt"]],
                    method=row["method"],
                    latent=int(row["latent"]),
                    factor=row["factor"],
                    text=row["text"],
                    changed=row["changed"],
                    concept=int(row["concept"]),
                    instruction_score=int(row["instruction"]),
                    fluency=int(row["fluency"]),
                    harmonic=float(row["harmonic"]),
                    scores=row,
                )
                for row in r.get("rows", list)
            ]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise PipelineInputError(f"{path}: a row is malformed ({e!r}); run the steering evaluation again") from None
        return SteeringEvalOutput(
            directory=directory,
            sae_sha256=m.get("inputs.sae_sha256", str),
            hook_point=r.get("hook_point", str),
            summary=r.get("summary", dict),
            latents=r.get("latents", list),
            output_scores={int(k): float(v) for k, v in r.get("output_scores", dict).items()},
            rows=rows,
            results=doc,
        )

    def recommended(self) -> dict[int, float]:
        """`add` strength at the best factor of the sweep, for the latents the sweep ran on."""
        return {
            r["latent"]: r["methods"]["sae"]["add_strength"]
            for r in self.latents
            if r["methods"]["sae"].get("add_strength")
        }

    def side_by_side(self, latent: int) -> list[dict]:
        """The latent's held-out rows per instruction: {"instruction", "none": row, "sae": row, ...}, for a
        table with each steered text beside the unsteered one."""
        out: dict[str, dict] = {}
        for row in self.rows:
            if row.latent == latent and row.phase == "test":
                out.setdefault(row.instruction, {"instruction": row.instruction})[row.method] = row
        return list(out.values())

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
