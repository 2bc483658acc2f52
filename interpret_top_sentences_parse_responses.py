"""Parse the interpretation answers into latent_index_meaning/, and score every explanation.

Usage:
    python interpret_top_sentences_parse_responses.py                   # meanings + offline (MiniLM) detection scores
    python interpret_top_sentences_parse_responses.py --judge none      # meanings only

Reads the explain task's raw results; extracts each verdict (JSON after an analysis, code fences,
integer or percent certainties) and validates it; every failure is kept with its reason in
<out>/explain/parse_failures.jsonl. Scores: detection by the offline judge (AUROC of MiniLM
similarity between the meaning and held-out activating vs. silent sentences) and, when the detect
task has answers, Claude's balanced accuracy. Writes latent_index_meaning/<run>.json (highest
certainty first; the file the browser, inference and the Gradio page read) and a manifest, and
writes the feature browser (runs/interpretation/browser/index.html) with the meanings and scores.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from llama_3.errors import PipelineInputError
from pipeline.core.cli import check_choices, parse_config, run_main
from pipeline.core.layout import BROWSER_NAME, INTERPRETATION_DIR, MEANINGS_DIR, TOP_SENTENCES_DIR
from pipeline.core.manifest import (
    MANIFEST_NAME,
    atomic_path,
    fingerprint,
    make_manifest,
    sha256_file,
    write_json_atomic,
)
from pipeline.core.output_folder import OutputFolder, owned_names
from pipeline.interpret.batches import (
    BatchState,
    bind_state_to_sae,
    message_text,
    parse_detection,
    parse_verdict,
    read_results,
    task_dir,
)
from pipeline.interpret.explainers import OFFLINE_JUDGE, LatentExamples, balanced_accuracy, mean, minilm_scores
from pipeline.report.feature_browser import write_browser
from pipeline.top_sentences.tables import Aggregation, open_top_sentences

FAILURES = "parse_failures.jsonl"


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


def explain_results(directory: Path) -> tuple[dict[int, dict], list[dict], str]:
    """latent -> verdict, failures, explainer name (model id or offline-ngram)."""
    state = BatchState.load(directory)
    results = read_results(directory)
    verdicts, failures, models = {}, [], set()
    for lat, (cid, entry) in sorted(state.latest().items()):
        if entry["status"] != "succeeded":
            failures.append(
                {
                    "latent": lat,
                    "custom_id": cid,
                    "reason": f"request {entry['status']}",
                    "detail": (results.get(cid) or {}).get("result", {}).get("error"),
                }
            )
            continue
        line = results.get(cid)
        if line is None:
            failures.append({"latent": lat, "custom_id": cid, "reason": "succeeded but no result line on disk"})
            continue
        models.add(line["result"]["message"].get("model", "unknown"))
        verdict, reason = parse_verdict(message_text(line))
        if verdict is None:
            failures.append({"latent": lat, "custom_id": cid, "reason": reason, "text": message_text(line)[-500:]})
        else:
            verdicts[lat] = verdict
    return verdicts, failures, "+".join(sorted(models)) or "none"


def claude_detection(directory: Path) -> dict[int, float]:
    """latent -> balanced accuracy of Claude's picks, from the detect task's answers (if any)."""
    if not (directory / "state.json").is_file():
        return {}
    state, results = BatchState.load(directory), read_results(directory)
    keys = state.extra.get("keys", {})
    out = {}
    for lat, (cid, entry) in state.latest().items():
        line, key = results.get(cid), keys.get(cid)
        if entry["status"] == "succeeded" and line is not None and key is not None:
            picked, _ = parse_detection(message_text(line), key["n"])
            if picked is not None:
                out[lat] = balanced_accuracy(picked, key["truth"], key["n"])
    return out


def parse_fingerprint(cfg: ParseConfig, directory: Path, data) -> str:
    """What the parse output depends on: the state and every results file, the top sentences, the
    Claude-judge results, and the config."""
    dirs = (directory, task_dir(cfg.out, "detect"))
    files = sorted(p for d in dirs for p in (d / "results").glob("*") if p.is_file())
    states = [BatchState.load(d).requests for d in dirs]  # the statuses; not the submission times
    return fingerprint(
        {
            "files": {str(p): sha256_file(p) for p in files},
            "states": states,
            "top_sentences": data.fingerprint,
            "config": asdict(cfg),
        }
    )


def main(cfg: ParseConfig) -> dict:
    data = open_top_sentences(cfg.top_sentences)
    directory = task_dir(cfg.out, "explain")
    browser = Path(cfg.out) / BROWSER_NAME
    if not (directory / "state.json").is_file():
        raise PipelineInputError(f"{directory}: nothing sent yet; run interpret_top_sentences_send_batches.py first")
    digest = data.sae_sha256
    bind_state_to_sae(BatchState.load(directory), digest, f"--out {cfg.out}")
    request = parse_fingerprint(cfg, directory, data)
    # The state folder is send's and retrieve's too: ours are the manifest and the failures list.
    folder = OutputFolder(
        directory, "interpretation", owned_names(MANIFEST_NAME, FAILURES), foreign_ok=True, replace_other=True
    )
    previous = folder.prepare(request, force=False).manifest
    if previous is not None and Path(previous.get("meaning_file", "")).is_file():
        print(
            f"{directory}: responses already parsed and scored for these results and settings -> "
            f"{previous['meaning_file']}"
        )
        if cfg.browser and not (browser / "index.html").is_file():
            print(f"feature browser: {write_browser(data, cfg.meanings, browser, cfg.browser_sentences).resolve()}")
        return previous["counts"]
    verdicts, failures, explainer = explain_results(directory)
    with atomic_path(directory / FAILURES) as tmp:
        tmp.write_text("".join(json.dumps(f) + "\n" for f in failures))
    examples = LatentExamples.load(data, cfg.aggregation)
    minilm = (
        minilm_scores(
            {lat: v["meaning"] for lat, v in verdicts.items()},
            examples,
            cfg.judge_activating,
            cfg.judge_silent,
            cfg.skip_top,
        )
        if cfg.judge == "minilm" and verdicts
        else {}
    )
    claude = claude_detection(task_dir(cfg.out, "detect"))
    latents = []
    for lat, v in verdicts.items():
        scores = {
            k: s
            for k, s in ((OFFLINE_JUDGE, minilm.get(lat)), ("claude-balanced-accuracy", claude.get(lat)))
            if s is not None
        }
        primary = scores.get("claude-balanced-accuracy", scores.get(OFFLINE_JUDGE))
        latents.append({"latent": lat, **v, "score": primary, "scores": scores})
    latents.sort(key=lambda e: (-e["certainty"], e["latent"]))
    name = cfg.run_name or f"{digest[:8]}-{explainer}"
    doc = {
        "sae_sha256": digest,
        "sae": str(data.sae_dir),
        "explainer": explainer,
        "judges": sorted({k for e in latents for k in e["scores"]}),
        "latents": latents,
    }
    Path(cfg.meanings).mkdir(parents=True, exist_ok=True)
    meaning_file = Path(cfg.meanings) / f"{name}.json"
    write_json_atomic(meaning_file, doc)
    summary = {
        "explained": len(latents),
        "failures": len(failures),
        "failure_reasons": sorted({f["reason"] for f in failures}),
        "mean_detection_auroc_minilm": mean(minilm.values()),
        "mean_detection_balanced_accuracy_claude": mean(claude.values()),
        "mean_certainty": mean(e["certainty"] for e in latents),
    }
    manifest = make_manifest(
        "interpretation",
        config=asdict(cfg),
        inputs={"top_sentences": cfg.top_sentences, "sae_sha256": digest},
        counts=summary,
        explainer=explainer,
        meaning_file=str(meaning_file),
        fingerprint=request,
    )
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    if cfg.browser:
        index = write_browser(data, cfg.meanings, browser, cfg.browser_sentences)
        print(f"feature browser: {index.resolve()}")
    auroc = summary["mean_detection_auroc_minilm"]
    print(
        f"{meaning_file}: {len(latents)} meanings by {explainer}, {len(failures)} failures"
        + (f"; mean detection AUROC (MiniLM judge) {auroc:.3f} over {len(minilm)} latents" if auroc is not None else "")
        + (
            f"; Claude judge balanced accuracy {summary['mean_detection_balanced_accuracy_claude']:.3f}"
            if claude
            else ""
        )
    )
    return manifest


if __name__ == "__main__":
    run_main(main, parse_config(ParseConfig, sys.argv[1:], __doc__))
