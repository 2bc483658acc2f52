"""The parse stage: verdicts out of the raw answers (failures kept with their reason), detection scores from the
offline judge and Claude, the meanings file.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from llama_3.errors import PipelineInputError
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
from pipeline.interpret.config import ParseConfig
from pipeline.interpret.embedding import E5Encoder
from pipeline.interpret.explainers import (
    OFFLINE_JUDGE,
    SECOND_JUDGE,
    LatentExamples,
    balanced_accuracy,
    detection_scores,
    mean,
    minilm_scores,
)
from pipeline.top_sentences.tables import open_top_sentences

FAILURES = "parse_failures.jsonl"
CLAUDE_JUDGE = "claude-balanced-accuracy"


def explain_results(directory: Path) -> tuple[dict[int, dict], list[dict], str]:
    """latent -> verdict, failures, explainer name (model id or offline-concept)."""
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


def held_out_counts(examples: LatentExamples, latents: list[int], test) -> dict:
    """How many held-out sentences the judges scored, in all and per latent (fewer for rare latents)."""
    splits = {lat: examples.judge_split(lat, test.activating, test.silent, test.hard, test.skip_top) for lat in latents}
    n_hard = sum(len(set(silent) & set(examples.hard.get(lat, []))) for lat, (_, silent) in splits.items())
    activating, silent = sum(len(a) for a, _ in splits.values()), sum(len(b) for _, b in splits.values())
    return {
        "activating": activating,
        "silent_random": silent - n_hard,
        "hard_negatives": n_hard,
        "per_latent_max": {"activating": test.activating, "silent": test.silent, "hard": test.hard},
        "explainer_saw_top": test.skip_top,
    }


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


def parse(cfg: ParseConfig) -> dict:
    data = open_top_sentences(cfg.top_sentences)
    directory = task_dir(cfg.out, "explain")
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
        return previous["counts"]
    verdicts, failures, explainer = explain_results(directory)
    with atomic_path(directory / FAILURES) as tmp:
        tmp.write_text("".join(json.dumps(f) + "\n" for f in failures))
    examples = LatentExamples.load(data, cfg.aggregation)
    minilm = (
        minilm_scores({lat: v["meaning"] for lat, v in verdicts.items()}, examples, cfg.test_set())
        if cfg.judge == "minilm" and verdicts
        else {}
    )
    sample = sorted(verdicts)
    sample = sorted(random.Random(0).sample(sample, min(cfg.second_judge_latents, len(sample))))
    e5 = (
        detection_scores({lat: verdicts[lat]["meaning"] for lat in sample}, examples, cfg.test_set(), E5Encoder())
        if cfg.second_judge == "e5" and sample
        else {}
    )
    claude = claude_detection(task_dir(cfg.out, "detect"))
    latents = []
    for lat, v in verdicts.items():
        judged = ((OFFLINE_JUDGE, minilm.get(lat)), (SECOND_JUDGE, e5.get(lat)), (CLAUDE_JUDGE, claude.get(lat)))
        scores = {k: s for k, s in judged if s is not None}
        primary = scores.get(CLAUDE_JUDGE, scores.get(OFFLINE_JUDGE))
        latents.append({"latent": lat, **v, "score": primary, "scores": scores})
    # the detection score (validated against hand ratings, tests/data/meaning_ratings) orders the file, not the
    # explainer's own certainty; unscored meanings last
    latents.sort(key=lambda e: (e["score"] is None, -(e["score"] or 0), e["latent"]))
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
        "mean_detection_auroc_e5": mean(e5.values()),
        "e5_latents": len(e5),
        "mean_minilm_on_e5_latents": mean(minilm.get(lat) for lat in e5),
        "mean_detection_balanced_accuracy_claude": mean(claude.values()),
        "test_sentences": held_out_counts(examples, sorted(verdicts), cfg.test_set()),
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
    auroc = summary["mean_detection_auroc_minilm"]
    print(
        f"{meaning_file}: {len(latents)} meanings by {explainer}, {len(failures)} failures"
        + (f"; mean detection AUROC (MiniLM judge) {auroc:.3f} over {len(minilm)} latents" if auroc is not None else "")
        + (
            f"; e5 judge {summary['mean_detection_auroc_e5']:.3f} over {len(e5)} latents"
            + (f" (MiniLM on those: {m:.3f})" if (m := summary["mean_minilm_on_e5_latents"]) is not None else "")
            if e5
            else ""
        )
        + (
            f"; Claude judge balanced accuracy {summary['mean_detection_balanced_accuracy_claude']:.3f}"
            if claude
            else ""
        )
    )
    return manifest
