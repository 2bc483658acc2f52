"""The send stage: one Message Batch request per latent (explain) or per meaning (detect), sent once and bound to
the SAE; offline, the concept explainer answers in the same state format.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from llama_3.errors import PipelineInputError
from pipeline.core.manifest import write_json_atomic
from pipeline.interpret.batches import (
    OFFLINE_BATCH,
    BatchState,
    adopt_pending,
    bind_state_to_sae,
    custom_id,
    detect_params,
    estimate_cost,
    explain_params,
    make_client,
    mark_tokens,
    parse_custom_id,
    read_results,
    submit,
    succeeded_line,
    task_dir,
    write_results,
)
from pipeline.interpret.config import SendConfig
from pipeline.interpret.explainers import (
    OFFLINE_EXPLAINER,
    LatentExamples,
    concept_answers,
    detection_prompt_sentences,
)
from pipeline.interpret.meanings import load_meanings
from pipeline.top_sentences.tables import open_top_sentences


def eligible_latents(cfg: SendConfig, examples: LatentExamples, frequency: dict[int, float]) -> list[int]:
    lats = [lat for lat, rows in examples.top.items() if len(rows) >= cfg.min_sentences]
    if cfg.latents:
        unknown = sorted(set(cfg.latents) - set(frequency))
        if unknown:
            raise PipelineInputError(f"--latents {unknown[:5]}: not latents of this SAE (0..{len(frequency) - 1})")
        lats = [lat for lat in lats if lat in set(cfg.latents)]
    lats.sort(key=lambda lat: (-frequency[lat], lat))
    return lats[: cfg.max_latents] if cfg.max_latents else lats


def build_requests(
    cfg: SendConfig, lats: list[int], examples: LatentExamples, state: BatchState, data
) -> tuple[list[dict], dict]:
    requests, keys = [], {}
    meanings = load_meanings(cfg.meanings, data.sae_sha256) if cfg.task == "detect" else {}
    for lat in lats:
        attempt = state.next_attempt(lat)
        if attempt is None:
            continue
        cid = custom_id(cfg.task, lat, attempt)
        if cfg.task == "explain":
            rows = examples.explainer_rows(lat, cfg.sentences_per_latent)  # the concept explainer's too
            peak = max(max(r["token_activations"], default=0) for r in rows)
            marked = [
                mark_tokens(examples.sentences[r["sentence_id"]]["tokens"], r["token_activations"], peak) for r in rows
            ]
            n_top = len(examples.top[lat][: cfg.sentences_per_latent])
            params = explain_params(lat, marked, n_top, cfg.model, cfg.max_tokens)
            requests.append({"custom_id": cid, "params": params})
        else:
            if lat not in meanings:
                continue
            texts, truth = detection_prompt_sentences(examples, lat, cfg.detect_test())
            requests.append(
                {"custom_id": cid, "params": detect_params(meanings[lat]["meaning"], texts, cfg.model, cfg.max_tokens)}
            )
            keys[cid] = {"truth": truth, "n": len(texts), "meaning": meanings[lat]["meaning"]}
    return requests, keys


def send(cfg: SendConfig) -> dict:
    directory = task_dir(cfg.out, cfg.task)
    data = open_top_sentences(cfg.top_sentences)
    examples = LatentExamples.load(data, cfg.aggregation)
    frequency = {r["latent"]: r["frequency"] for r in data.table("latent_stats", ["latent", "frequency"]).to_pylist()}
    offline = cfg.offline or not os.environ.get("ANTHROPIC_API_KEY")
    if cfg.force and directory.exists() and not cfg.dry_run:
        shutil.rmtree(directory)  # batches still running on the API are abandoned (their results never read)
    elif offline and cfg.task == "explain" and not cfg.dry_run and (older := earlier_offline_explainers(directory)):
        # answers of an earlier offline explainer (offline-ngram) would otherwise be kept as "already answered"
        print(f"{directory}: answers by {', '.join(older)}, not {OFFLINE_EXPLAINER}: explaining again")
        shutil.rmtree(directory)
    state = BatchState.load(directory)
    bind_state_to_sae(state, data.sae_sha256, f"--out {cfg.out} ({cfg.task})")
    if offline and cfg.task == "detect" and not cfg.dry_run:
        raise PipelineInputError(
            "--task detect sends to Claude and needs ANTHROPIC_API_KEY; the offline judge runs in the parse step"
        )
    client = None if offline or cfg.dry_run else make_client(cfg.base_url, cfg.max_retries)
    if client is not None:
        adopt_pending(state, client)
    lats = eligible_latents(cfg, examples, frequency)
    requests, keys = build_requests(cfg, lats, examples, state, data)
    estimate = estimate_cost(requests, cfg.model, cfg.expected_output_tokens)
    directory.mkdir(parents=True, exist_ok=True)
    if cfg.dry_run:
        path = directory / "dry_run.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in requests))
        print(
            f"{path}: {len(requests)} requests (nothing sent); estimated ${estimate['usd_est']:.2f} with {cfg.model} "
            "batches"
        )
        return {"requests": len(requests), "estimate": estimate}
    state.extra.setdefault("keys", {}).update(keys)
    if requests and offline:  # nothing new to send: the state stays exactly as it is
        explain_offline(state, directory, requests, examples, cfg.sentences_per_latent)
    elif requests:
        submit(state, client, requests)
    summary = {
        "task": cfg.task,
        "requests_sent": len(requests),
        "latents_eligible": len(lats),
        "offline": offline,
        "model": OFFLINE_EXPLAINER if offline else cfg.model,
        "estimate": None if offline else estimate,
        "sent_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "submissions": len(state.submissions),
        "outcome": "computed" if requests else "reused",  # nothing new to send: the state is reused as it is
    }
    write_json_atomic(directory / "send_manifest.json", {"config": asdict(cfg), **summary})
    where = (
        "explained offline"
        if offline
        else f"submitted in {len({r['submission'] for r in state.requests.values()})} batch(es)"
    )
    if not requests:
        print(f"{directory}: nothing new to send; all {len(lats)} eligible latents were submitted or answered before")
    else:
        print(
            f"{directory}: {len(requests)} requests {where}; {len(lats) - len(requests)} latents were submitted or "
            "answered before"
            + (
                ""
                if offline
                else f"; estimated ${estimate['usd_est']:.2f} (${estimate['usd_per_1000_requests_est']:.2f} per 1,000 "
                "latents)"
            )
        )
    return summary


def earlier_offline_explainers(directory: Path) -> list[str]:
    """The other offline explainers whose answers the state holds, when it holds only offline answers (answers
    Claude was paid for are never discarded here: --force does that)."""
    if not (directory / "results").is_dir():
        return []
    models = {line["result"].get("message", {}).get("model", "") for line in read_results(directory).values()}
    if not models or not all(m.startswith("offline-") for m in models):
        return []
    return sorted(models - {OFFLINE_EXPLAINER})


def explain_offline(state: BatchState, directory: Path, requests: list[dict], examples: LatentExamples, n_train: int):
    lats = {r["custom_id"]: parse_custom_id(r["custom_id"])[1] for r in requests}
    answers = concept_answers(examples, sorted(set(lats.values())), n_train)
    lines = [succeeded_line(cid, answers[lat], OFFLINE_EXPLAINER) for cid, lat in lats.items()]
    name = f"{OFFLINE_BATCH}-{len(state.submissions)}"
    write_results(directory / "results" / f"{name}.jsonl", lines)
    state.add_submission(name, [r["custom_id"] for r in requests], "succeeded", ended=True)
    state.save()
