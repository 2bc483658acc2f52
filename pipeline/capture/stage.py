"""The capture stage: each rank's sentences through a capture-only forward, packed real-token activations handed to
the background shard writer, resumable; the manifest once every rank is done.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from llama_3 import HookPoint, default_capture_layer, load_model
from llama_3.checkpoints import LoadedModel
from llama_3.cpu_fast import apply_cpu_fast_paths
from llama_3.cpu_features import warn_if_emulated
from llama_3.errors import PipelineInputError
from pipeline.capture.activations import (
    KIND,
    PROGRESS_PREFIX,
    SHARD_PREFIX,
    ShardWriter,
    TokenChunk,
    progress_filename,
    rank_shard_glob,
)
from pipeline.capture.config import CaptureConfig
from pipeline.core import fault_injection
from pipeline.core.cli import resolve_dtype
from pipeline.core.distributed import SHARED_PROBE, DistInfo, barrier, check_shared_folder
from pipeline.core.manifest import MANIFEST_NAME, fingerprint, make_manifest, write_json_atomic
from pipeline.core.output_folder import OutputFolder, config_request, owned_names
from pipeline.core.runtime import capture_dtype, forward_batch_tokens
from pipeline.sentences.dataset import SentenceBatch, SentenceDataset, SentenceTokenDataset


def _progress_path(out: Path, rank: int) -> Path:
    return out / progress_filename(rank)


def output_folder(cfg: CaptureConfig) -> OutputFolder:
    return OutputFolder(
        Path(cfg.out),
        "capture",
        owned_names(
            MANIFEST_NAME,
            SHARED_PROBE,
            prefixes=(SHARD_PREFIX, PROGRESS_PREFIX, "." + SHARD_PREFIX, "." + PROGRESS_PREFIX),
        ),
        progress=(PROGRESS_PREFIX + "*.json",),
    )


@dataclass
class CaptureRequest:
    """What this rank captures, resolved from the flags and the model: the output depends on `request`."""

    lm: LoadedModel
    hooks: list[str]
    bos: int
    """1 when a BOS is prepended (its activation is never stored)."""
    storage_dtype: torch.dtype
    dataset: SentenceTokenDataset
    """This rank's sentences, as length-sorted token batches."""
    request: dict
    fingerprint: str


def open_request(cfg: CaptureConfig, info: DistInfo) -> CaptureRequest:
    """The flags and the sentences are checked before the model loads (seconds to minutes)."""
    storage_dtype = resolve_dtype(cfg.storage_dtype)
    if cfg.shard_tokens < 1 or cfg.max_tokens < 1:
        raise PipelineInputError("--shard-tokens and --max-tokens must be positive")
    model_dtype = resolve_dtype(cfg.model_dtype) or capture_dtype(info.device)
    for h in cfg.hook_points:
        HookPoint.parse(h, flag="--hook-points")
    SentenceDataset.open(cfg.sentences)
    warn_if_emulated(model_dtype, info.device, f"--model-dtype {cfg.model_dtype}")
    lm = load_model(cfg.model, device=info.device, dtype=model_dtype)
    apply_cpu_fast_paths(lm.model)
    n_layers = lm.args.n_layers
    hooks = cfg.hook_points or [f"resid_pre.{default_capture_layer(n_layers)}"]
    points = [HookPoint.parse(h, n_layers, "--hook-points") for h in hooks]
    hooks = [p.name for p in points]
    if len(set(hooks)) != len(hooks):
        raise PipelineInputError(f"--hook-points: {hooks} names a point twice")
    bos = 1 if cfg.add_bos else 0
    if bos and lm.tokenizer.bos_id is None:
        raise PipelineInputError(f"--add-bos: {lm.path} has no BOS token")
    batch_tokens = cfg.max_batch_tokens or forward_batch_tokens(info.device)
    dataset = SentenceTokenDataset(
        cfg.sentences,
        lm.tokenizer,
        max_tokens=cfg.max_tokens + bos,
        add_bos=cfg.add_bos,
        max_batch_tokens=batch_tokens,
        max_batch_size=cfg.max_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        max_sentences=cfg.max_sentences,
    )
    request = {  # the config, with what it resolved to
        **config_request(cfg),
        "model": lm.identity(),
        "hook_points": hooks,
        "model_dtype": str(model_dtype),
        "storage_dtype": str(storage_dtype),
        "max_batch_tokens": batch_tokens,  # what 0 (auto) became: batches round differently
        "sentences": {"path": str(Path(cfg.sentences)), "fingerprint": dataset.fingerprint},
    }
    return CaptureRequest(lm, hooks, bos, storage_dtype, dataset, request, fingerprint(request))


def rank_progress(out: Path, info: DistInfo, fp: str) -> tuple[Path, dict]:
    """This rank's progress file and what it holds (a fresh one when it starts); shard files no progress
    entry vouches for and temporary files of a killed run are removed."""
    progress_path = _progress_path(out, info.rank)
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else None
    if progress and progress["world_size"] != info.world_size:
        raise PipelineInputError(
            f"{progress_path}: this capture was started with {progress['world_size']} ranks; resume with the same "
            "number or --force"
        )
    progress = progress or {
        "fingerprint": fp,
        "rank": info.rank,
        "world_size": info.world_size,
        "shards": [],
        "finished": False,
    }
    keep = {s["file"] for s in progress["shards"]}
    for p in out.glob(rank_shard_glob(info.rank)):
        if p.name not in keep:
            p.unlink()
    for p in out.glob(f".{progress_path.name}.*.tmp"):  # a progress write cut short by a kill
        p.unlink()
    return progress_path, progress


def capture(cfg: CaptureConfig, info: DistInfo) -> dict:
    out = Path(cfg.out)
    req = open_request(cfg, info)
    prepared = output_folder(cfg).prepare(req.fingerprint, cfg.force, info)
    check_shared_folder(info, out)  # every rank writes shards here: a node-local folder fails now, not at the end
    if prepared.state == "reuse":
        if info.is_main:
            tokens = prepared.manifest["counts"]["tokens"]
            print(f"capture already complete: {out} ({tokens} tokens); --force recaptures")
        return prepared.manifest
    progress_path, progress = rank_progress(out, info, req.fingerprint)

    def on_shard(shard: dict) -> None:
        progress["shards"].append(shard)
        write_json_atomic(progress_path, progress)

    committed = sum(s["n_tokens"] for s in progress["shards"])
    writer = ShardWriter(
        out,
        info.rank,
        req.hooks,
        req.lm.args.dim,
        req.storage_dtype,
        cfg.shard_tokens,
        len(progress["shards"]),
        on_shard,
        device=info.device,
    )
    t0 = time.perf_counter()
    new_tokens = capture_batches(req, info, writer, committed)
    elapsed = time.perf_counter() - t0
    progress.update(finished=True, stats=dict(req.dataset.stats), seconds=elapsed, new_tokens=new_tokens)
    write_json_atomic(progress_path, progress)
    barrier(info)
    if not info.is_main:
        return {}
    return finalize(out, cfg, req.request, req.fingerprint, info, req.lm, req.hooks)


def capture_batches(req: CaptureRequest, info: DistInfo, writer: ShardWriter, committed: int) -> int:
    """Every batch of this rank through the capture-only forward, its activations to the writer; the first
    `committed` tokens (in finished shards) are skipped without a forward. Returns the new tokens."""
    seen = 0  # real tokens of this rank's stream so far, stored or not
    new_tokens = 0
    bar = tqdm(
        total=req.dataset.n_sentences,
        unit="sent",
        desc=f"capture r{info.rank}",
        disable=not info.is_main,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    try:
        for batch in req.dataset:
            real = batch.n_tokens - req.bos * len(batch.lengths)
            bar.update(len(batch.lengths))
            if seen + real <= committed:  # entirely in completed shards: no forward needed
                seen += real
                continue
            skip = max(0, committed - seen)
            seen += real
            with torch.inference_mode():
                acts = req.lm.model.capture(batch.tokens.to(info.device, non_blocking=True), req.hooks)
            writer.put(make_chunk(acts, batch, req.bos, skip, info.device, req.storage_dtype))
            fault_injection.point("capture.batch")
            new_tokens += real - skip
            if bar.n and info.is_main:
                bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - t0):.0f} tokens/s", refresh=False)
        writer.close()
    finally:
        bar.close()
    return new_tokens


def make_chunk(
    acts: dict[str, torch.Tensor],
    batch: SentenceBatch,
    bos: int,
    skip: int,
    device: torch.device,
    storage_dtype: torch.dtype,
) -> TokenChunk:
    """Pack real text tokens of a [B, T] batch row-major, minus BOS columns and the first `skip` tokens.

    `skip` > 0 only on resume, for the batch that a completed shard cut in two.
    """
    T = batch.tokens.shape[1]
    col = torch.arange(T)[None, :]
    keep = (col < batch.lengths[:, None]) & (col >= bos)  # [B, T]
    sids, firsts, ns = [], [], []
    for row, (sid, n) in enumerate(zip(batch.sentence_ids.tolist(), (batch.lengths - bos).tolist())):
        first = min(skip, n)
        skip -= first
        keep[row, bos : bos + first] = False
        if first < n:
            sids.append(sid)
            firsts.append(first)
            ns.append(n - first)
    keep_dev = keep.to(device, non_blocking=True)
    # [n, d_model], row-major: sentence by sentence; cast on the device (half the bytes to copy off a GPU)
    packed = {h: a[keep_dev].to(storage_dtype) for h, a in acts.items()}
    ready = None
    if device.type == "cuda":
        packed = {h: a.to("cpu", non_blocking=True) for h, a in packed.items()}  # pinned, async
        ready = torch.cuda.Event()
        ready.record()
    return TokenChunk(packed, batch.tokens[keep], sids, firsts, ns, ready)


def finalize(out: Path, cfg: CaptureConfig, request: dict, fp: str, info: DistInfo, lm, hooks: list[str]) -> dict:
    """Rank 0, after every rank finished: merge the progress files into the manifest."""
    shards, totals, seconds, new_tokens = [], {"sentences": 0, "tokens": 0, "truncated_sentences": 0}, 0.0, 0
    for r in range(info.world_size):
        p = json.loads(_progress_path(out, r).read_text())
        if not p.get("finished"):
            raise PipelineInputError(f"{_progress_path(out, r)}: rank {r} did not finish")
        shards += [{**s, "rank": r} for s in p["shards"]]
        totals["sentences"] += p["stats"].get("sentences", 0)
        totals["truncated_sentences"] += p["stats"].get("truncated_sentences", 0)
        seconds = max(seconds, p["seconds"])
        new_tokens += p["new_tokens"]
    totals["tokens"] = sum(s["n_tokens"] for s in shards)
    totals["bytes"] = sum(s["bytes"] for s in shards)
    layers = sorted({HookPoint.parse(h).layer for h in hooks})
    manifest = make_manifest(
        KIND,
        config=asdict(cfg),
        inputs={"sentences": request["sentences"], "model": request["model"]},
        counts=totals,
        fingerprint=fp,
        hook_points=hooks,
        layers=layers,
        d_model=lm.args.dim,
        model_dtype=request["model_dtype"],
        storage_dtype=request["storage_dtype"],
        bos_policy="BOS prepended; its position is not stored" if cfg.add_bos else "no BOS",
        tokenization={"add_bos": cfg.add_bos, "max_tokens": cfg.max_tokens},
        selection={"max_sentences": cfg.max_sentences},
        tokenizer={"source": lm.tokenizer.source, "sha256": lm.tokenizer.fingerprint()},
        world_size=info.world_size,
        shard_tokens=cfg.shard_tokens,
        shards=shards,
        throughput={
            "seconds": round(seconds, 2),
            "tokens_this_run": new_tokens,
            "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
        },
        tensors={
            "act.<hook>": "[n_tokens, d_model]",
            "token_ids": "[n_tokens] int32",
            "sentence_ids": "[n_sentences] int64",
            "sentence_starts": "[n_sentences + 1] int64",
            "sentence_first_position": "[n_sentences] int32",
        },
    )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    for r in range(info.world_size):
        _progress_path(out, r).unlink(missing_ok=True)
    gb = totals["bytes"] / 1e9
    print(
        f"{out}: {totals['sentences']} sentences, {totals['tokens']} tokens at {', '.join(hooks)} "
        f"({totals['truncated_sentences']} truncated) in {len(shards)} shards, {gb:.2f} GB written, "
        f"{new_tokens / max(seconds, 1e-9):.0f} tokens/s this run"
    )
    return manifest
