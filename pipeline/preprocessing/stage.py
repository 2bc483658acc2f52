"""The preprocessing stage: one pass over the capture (verify each shard, fold training tokens into exact moments,
write them grouped by shuffle bucket), then each bucket sorted in memory; the statistics and the manifest.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from tqdm import tqdm

from llama_3.errors import PipelineInputError
from pipeline.capture.activations import CaptureOutput, act_key, load_shard
from pipeline.core.manifest import MANIFEST_NAME, fingerprint, make_manifest, write_json_atomic
from pipeline.core.output_folder import OutputFolder, config_request, owned_names
from pipeline.core.tokenization import Tokenization
from pipeline.preprocessing.config import PreprocessConfig
from pipeline.preprocessing.preprocessed import (
    KIND,
    OUTPUT_FILES,
    STATS,
    TORCH_TO_NP,
    TRAIN_ACTS,
    TRAIN_INDEX,
    VAL_ACTS,
    VAL_INDEX,
    VAL_SENTENCE_IDS,
    Moments,
)
from pipeline.preprocessing.shuffle import bucket_bits, bucket_of, row_keys, shuffled_order

BAR = {"dynamic_ncols": True}


def val_mask(sentence_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Seeded, order-free choice of held-out sentences: splitmix64(id, seed) / 2^64 < fraction."""
    x = sentence_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def rows_of(meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (sentence_id, position) of a shard from its per-sentence offsets."""
    starts = meta["sentence_starts"].numpy()
    lens = np.diff(starts)
    sids = np.repeat(meta["sentence_ids"].numpy(), lens)
    pos = (
        np.arange(starts[-1])
        - np.repeat(starts[:-1], lens)
        + np.repeat(meta["sentence_first_position"].numpy().astype(np.int64), lens)
    )
    return sids, pos


def _process_shard(task: dict) -> dict:
    """Worker: verify, load, fold train tokens into moments, write train rows by bucket and val rows."""

    torch.set_num_threads(task["threads"])  # workers share the cores; oversubscription slows them all
    path = Path(task["path"])
    data = path.read_bytes()  # read once: hash and parse the same bytes
    if hashlib.sha256(data).hexdigest() != task["sha256"]:
        raise PipelineInputError(f"{path}: checksum differs from the capture manifest (corrupted shard)")
    try:
        t = st_load(data)
    except Exception as e:
        raise PipelineInputError(f"{path}: not a readable activation shard ({str(e).splitlines()[0]})") from None
    key = task["key"]
    if key not in t or tuple(t[key].shape) != (task["n_tokens"], task["d_model"]):
        raise PipelineInputError(
            f"{path}: no {key} of shape [{task['n_tokens']}, {task['d_model']}] (from another capture?)"
        )
    a = t[key]
    raw = a.view(torch.int16).numpy().view(np.uint16) if a.dtype == torch.bfloat16 else a.numpy()
    sids, pos = rows_of(t)
    excluded = pos < task["exclude_first"]
    excluded[task["sink_rows"]] = True  # massive activations, found by the plan
    is_val = ~excluded & val_mask(sids, task["seed"], task["val_fraction"])
    is_train = ~excluded & ~is_val
    sq = torch.linalg.vector_norm(a, dim=1, dtype=torch.float32).double().pow(2).numpy()  # only for the policy report
    moments = Moments.of(a[torch.from_numpy(is_train)])
    # Pass 1 of the shuffle: this shard's training rows, grouped by bucket, each group one contiguous write
    # after the earlier shards' rows of its bucket (pipeline/preprocessing/shuffle.py).
    t_sids, t_pos, t_raw = sids[is_train], pos[is_train], raw[is_train]
    bucket = bucket_of(row_keys(t_sids, t_pos, task["seed"]), task["bucket_bits"])
    order = np.argsort(bucket, kind="stable")
    t_sids, t_pos, t_raw, bucket = t_sids[order], t_pos[order], t_raw[order], bucket[order]
    cuts = np.searchsorted(bucket, np.arange(len(task["bucket_dest"]) + 1))
    with open(task["train_acts"], "r+b") as fa, open(task["train_index"], "r+b") as fi:
        for b, dest in enumerate(task["bucket_dest"]):
            lo, hi = cuts[b], cuts[b + 1]
            if lo < hi:
                write_rows(fa, task["train_acts_offset"], dest, t_raw[lo:hi])
                write_rows(fi, task["train_index_offset"], dest, np.stack([t_sids[lo:hi], t_pos[lo:hi]], 1))
    if is_val.any():  # held-out rows keep capture order: each shard's one contiguous run
        with open(task["val_acts"], "r+b") as fa, open(task["val_index"], "r+b") as fi:
            write_rows(fa, task["val_acts_offset"], task["val_start"], raw[is_val])
            write_rows(fi, task["val_index_offset"], task["val_start"], np.stack([sids[is_val], pos[is_val]], 1))
    kept_norms = np.sqrt(sq[~excluded])
    return {
        "index": task["index"],
        "sinks": len(task["sink_rows"]),
        "moments": moments,
        "bytes": len(data),
        "sq_norm_excluded": float(sq[excluded].sum()),
        "sq_norm_kept": float(sq[~excluded].sum()),
        "max_norm_excluded": float(np.sqrt(sq[excluded].max())) if excluded.any() else 0.0,
        "norm_sample": kept_norms[::16].tolist(),
    }


def write_rows(f, header: int, first_row: int, rows: np.ndarray) -> None:
    """Write rows [n, ...] at row `first_row` of a preallocated .npy (plain writes: no dirty mapped pages)."""
    rows = np.ascontiguousarray(rows)
    f.seek(header + first_row * rows[0].nbytes)
    f.write(rows.tobytes())


def read_rows(f, header: int, first_row: int, n: int, dtype, width: int) -> np.ndarray:
    out = np.empty((n, width), dtype)
    f.seek(header + first_row * out[0].nbytes if n else header)
    f.readinto(memoryview(out).cast("B"))
    return out


def _sort_bucket(task: dict) -> int:
    """Pass 2 of the shuffle: one bucket's region read whole, sorted by key, written back in place."""
    a, n = task["start"], task["rows"]
    with open(task["train_acts"], "r+b") as fa, open(task["train_index"], "r+b") as fi:
        acts = read_rows(fa, task["train_acts_offset"], a, n, task["dtype"], task["d_model"])
        index = read_rows(fi, task["train_index_offset"], a, n, np.int64, 2)
        order = shuffled_order(row_keys(index[:, 0], index[:, 1], task["seed"]), index[:, 0], index[:, 1])
        write_rows(fa, task["train_acts_offset"], a, acts[order])
        write_rows(fi, task["train_index_offset"], a, index[order])
    return acts.nbytes


def preallocate(path: Path, dtype, shape: tuple[int, int]) -> int:
    """An .npy of this shape (sparse until written); returns its header size."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset = arr.offset
    del arr
    return offset


META = ["sentence_ids", "sentence_starts", "sentence_first_position"]


def token_norms(cap: CaptureOutput, hook: str, exclude_first: int) -> list[np.ndarray]:
    """Per shard, [n_tokens] float32 activation norms at the hook, -inf at the excluded first positions."""
    out = []
    for p in cap.shard_paths:
        t = load_shard(p, META + [act_key(hook)])
        norms = torch.linalg.vector_norm(t[act_key(hook)], dim=1, dtype=torch.float32).numpy()
        out.append(np.where(rows_of(t)[1] < exclude_first, -np.inf, norms).astype(np.float32))
    return out


def find_sinks(cap: CaptureOutput, hook: str, exclude_first: int, ratio: float) -> tuple[float, list[np.ndarray]]:
    """(sink_norm, per shard the row indices of the tokens above it): ratio x the median norm of the tokens
    left after the position rule. Massive activations sit far above it (the second piece of a split first
    word: 20-90x the median centred norm at SmolLM2's resid_pre.25, one token in ~10,000, yet half the
    held-out variance). One read of the capture, before the split: the counts must be known to preallocate
    the output."""
    if not ratio:
        return 0.0, [np.zeros(0, dtype=np.int64) for _ in cap.shard_paths]
    norms = token_norms(cap, hook, exclude_first)
    kept = np.concatenate(norms)
    kept = kept[np.isfinite(kept)]
    sink_norm = float(ratio * np.median(kept)) if len(kept) else 0.0
    return sink_norm, [np.flatnonzero(n > sink_norm) for n in norms]


def plan(cap: CaptureOutput, cfg: PreprocessConfig, exclude_first: int, bits: int, sink_rows: list[np.ndarray]):
    """Metadata-only pass: per-shard train/val/excluded counts and training rows per bucket, the held-out
    sentence ids."""

    counts, per_bucket, val_ids = [], [], set()
    for p, s, sinks in zip(cap.shard_paths, cap.shards, sink_rows):
        meta = load_shard(p, META)
        sids, pos = rows_of(meta)
        if len(sids) != s["n_tokens"]:
            raise PipelineInputError(f"{p}: holds {len(sids)} tokens, the capture manifest says {s['n_tokens']}")
        excluded = pos < exclude_first
        excluded[sinks] = True
        is_val = ~excluded & val_mask(sids, cfg.seed, cfg.val_fraction)
        is_train = ~excluded & ~is_val
        val_ids.update(np.unique(sids[is_val]).tolist())
        counts.append((int(is_train.sum()), int(is_val.sum()), int(excluded.sum())))
        keys = row_keys(sids[is_train], pos[is_train], cfg.seed)
        per_bucket.append(np.bincount(bucket_of(keys, bits), minlength=2**bits))
    return counts, np.stack(per_bucket), np.array(sorted(val_ids), dtype=np.int64)


def output_folder(cfg: PreprocessConfig) -> OutputFolder:
    return OutputFolder(Path(cfg.out), "preprocessing", owned_names(MANIFEST_NAME, *OUTPUT_FILES, prefixes=(".",)))


@dataclass
class Request:
    """What the output depends on, checked against the capture before any work."""

    cap: CaptureOutput
    hook: str
    exclude_first: int
    sink_norm_ratio: float
    tokenization: Tokenization  # its sink_norm is the plan's
    fingerprint: str


def check_request(cfg: PreprocessConfig) -> Request:
    capture_dir = Path(cfg.capture)
    cap = CaptureOutput.open(capture_dir)
    hook = cfg.hook_point or cap.hook_points[0]
    if hook not in cap.hook_points:
        raise PipelineInputError(
            f"--hook-point {hook}: not captured in {capture_dir} (has {', '.join(cap.hook_points)})"
        )
    if cfg.batch_size < 1 or not 0 <= cfg.val_fraction < 1 or cfg.workers < 1 or cfg.memory_gb <= 0:
        raise PipelineInputError(
            "--batch-size, --workers and --memory-gb must be positive and --val-fraction in [0, 1)"
        )
    exclude_first = (
        cfg.exclude_first_positions if cfg.exclude_first_positions >= 0 else (0 if cap.tokenization.add_bos else 1)
    )
    if cfg.sink_norm_ratio >= 0:
        ratio = cfg.sink_norm_ratio
    else:  # massive activations live in the residual stream
        ratio = 10.0 if hook.split(".")[0] in ("resid_pre", "resid_mid", "resid_post") else 0.0
    request = {
        **config_request(cfg),
        "capture": cap.fingerprint,
        "hook_point": hook,
        "exclude_first_positions": exclude_first,
        "sink_norm_ratio": ratio,
    }
    tokenization = replace(cap.tokenization, exclude_first_positions=exclude_first)
    return Request(cap, hook, exclude_first, ratio, tokenization, fingerprint(request))


@dataclass
class Plan:
    """Where every row goes: the preallocated files, one task per shard (pass 1) and per bucket (pass 2)."""

    n_train: int
    n_val: int
    n_excluded: int
    sink_norm: float
    n_sinks: int
    val_ids: np.ndarray
    bits: int
    row_bytes: int
    shard_tasks: list[dict]
    sort_tasks: list[dict]


def plan_passes(req: Request, cfg: PreprocessConfig) -> Plan:
    cap, out, d = req.cap, Path(cfg.out), req.cap.d_model
    np_dtype = TORCH_TO_NP[cap.storage_dtype]
    row_bytes = d * np.dtype(np_dtype).itemsize
    bits = bucket_bits(cap.tokens, row_bytes, int(cfg.memory_gb * 1e9), min(cfg.workers, len(cap.shards)))
    sink_norm, sink_rows = find_sinks(cap, req.hook, req.exclude_first, req.sink_norm_ratio)
    counts, per_bucket, val_ids = plan(cap, cfg, req.exclude_first, bits, sink_rows)  # per_bucket [shards, buckets]
    n_train, n_val, n_excl = (sum(c[i] for c in counts) for i in range(3))
    if n_train == 0:
        raise PipelineInputError(f"{cfg.capture}: no training tokens left after the split and exclusions")
    if cfg.batch_size > n_train:
        raise PipelineInputError(
            f"--batch-size {cfg.batch_size}: larger than the {n_train} training tokens in {cfg.capture}"
        )
    files = {
        "train_acts": preallocate(out / TRAIN_ACTS, np_dtype, (n_train, d)),
        "train_index": preallocate(out / TRAIN_INDEX, np.int64, (n_train, 2)),
        "val_acts": preallocate(out / VAL_ACTS, np_dtype, (n_val, d)),
        "val_index": preallocate(out / VAL_INDEX, np.int64, (n_val, 2)),
    }
    where = {k: str(out / f"{k}.npy") for k in files} | {f"{k}_offset": v for k, v in files.items()}
    bucket_sizes = per_bucket.sum(0)
    bucket_start = np.concatenate([[0], np.cumsum(bucket_sizes)])
    # a shard's rows of bucket b go after the earlier shards' rows of bucket b
    dest = bucket_start[:-1][None, :] + np.cumsum(per_bucket, 0) - per_bucket  # [shards, buckets]
    threads = max(1, torch.get_num_threads() // min(cfg.workers, len(cap.shards)))
    tasks, v_off = [], 0
    for i, (p, s, c) in enumerate(zip(cap.shard_paths, cap.shards, counts)):
        tasks.append(
            {
                "index": i,
                "path": str(p),
                "sha256": s["sha256"],
                "n_tokens": s["n_tokens"],
                "d_model": d,
                "key": act_key(req.hook),
                "exclude_first": req.exclude_first,
                "sink_rows": sink_rows[i],
                "seed": cfg.seed,
                "val_fraction": cfg.val_fraction,
                "bucket_bits": bits,
                "bucket_dest": dest[i].tolist(),
                "val_start": v_off,
                "threads": threads,
                **where,
            }
        )
        v_off += c[1]
    sort_tasks = [
        {"start": int(bucket_start[b]), "rows": int(n), "seed": cfg.seed, "dtype": np_dtype, "d_model": d, **where}
        for b, n in enumerate(bucket_sizes.tolist())
        if n
    ]
    n_sinks = sum(map(len, sink_rows))
    return Plan(n_train, n_val, n_excl, sink_norm, n_sinks, val_ids, bits, row_bytes, tasks, sort_tasks)


def run_passes(p: Plan, cfg: PreprocessConfig, total_bytes: int) -> list[dict]:
    """Pass 1 (every shard) then pass 2 (every bucket), on worker processes when --workers > 1."""
    results: list[dict] = [None] * len(p.shard_tasks)  # type: ignore[list-item]
    pool = mp.get_context("spawn").Pool(min(cfg.workers, len(p.shard_tasks))) if cfg.workers > 1 else None
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="preprocess", **BAR) as bar:
            for r in pool.imap_unordered(_process_shard, p.shard_tasks) if pool else map(_process_shard, p.shard_tasks):
                results[r["index"]] = r
                bar.update(r["bytes"])
        train_bytes = p.n_train * p.row_bytes
        with tqdm(total=train_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="shuffle", **BAR) as bar:
            for n in pool.imap_unordered(_sort_bucket, p.sort_tasks) if pool else map(_sort_bucket, p.sort_tasks):
                bar.update(n)
    finally:
        if pool is not None:
            pool.terminate()
    return results


def dataset_stats(results: list[dict], d_model: int) -> dict:
    """The training tokens' exact statistics: the shards' moments merged in shard order (identical bits
    whatever the number of workers)."""
    moments = Moments.empty(d_model)
    for r in results:
        moments = moments.merge(r["moments"])
    norms = np.array([x for r in results for x in r["norm_sample"]])
    return {
        "count": moments.n,
        "mean": moments.mean.tolist(),
        "var": moments.var.tolist(),
        "mean_sq_norm": moments.sq_norm_sum / moments.n,
        "mean_centered_sq_norm": float(moments.m2.sum() / moments.n),
        "median_norm_sampled": float(np.median(norms)) if len(norms) else 0.0,
        "dtype": "float64",
        "split": "train",
    }


def preprocess(cfg: PreprocessConfig) -> dict:
    req = check_request(cfg)
    cap, out = req.cap, Path(cfg.out)
    prepared = output_folder(cfg).prepare(req.fingerprint, cfg.force)
    if prepared.state == "reuse":
        print(f"preprocessing already done: {out}; --force redoes it")
        return prepared.manifest
    p = plan_passes(req, cfg)
    total_bytes = sum(s["bytes"] for s in cap.shards)
    t0 = time.perf_counter()
    results = run_passes(p, cfg, total_bytes)
    elapsed = time.perf_counter() - t0
    stats = dataset_stats(results, cap.d_model)
    write_json_atomic(out / STATS, stats)
    np.save(out / VAL_SENTENCE_IDS, p.val_ids)
    manifest = build_manifest(cfg, req, p, results, stats, elapsed, total_bytes)
    assert p.n_train + p.n_val + p.n_excluded == cap.tokens
    write_json_atomic(out / MANIFEST_NAME, manifest)
    print(
        f"{out}: {p.n_train} train tokens ({manifest['counts']['train_batches']} batches of {cfg.batch_size}, last "
        f"{manifest['counts']['last_batch_size']}), "
        f"{p.n_val} validation tokens from {len(p.val_ids)} sentences, {p.n_excluded} excluded "
        f"({p.n_sinks} of them massive activations, norm > {p.sink_norm:.4g}); "
        f"{total_bytes / 1e9 / elapsed:.2f} GB/s"
    )
    return manifest


def build_manifest(
    cfg: PreprocessConfig, req: Request, p: Plan, results: list[dict], stats: dict, elapsed: float, total_bytes: int
) -> dict:
    n_batches = -(-p.n_train // cfg.batch_size)
    sq_excl, sq_kept = sum(r["sq_norm_excluded"] for r in results), sum(r["sq_norm_kept"] for r in results)
    train_bytes = p.n_train * p.row_bytes
    return make_manifest(
        KIND,
        config=asdict(cfg),
        inputs={
            "capture": str(Path(cfg.capture)),
            "capture_fingerprint": req.cap.fingerprint,
            "model": req.cap.model,
        },
        counts={
            "captured_tokens": req.cap.tokens,
            "train_tokens": p.n_train,
            "val_tokens": p.n_val,
            "excluded_tokens": p.n_excluded,
            "sink_tokens": p.n_sinks,
            "val_sentences": len(p.val_ids),
            "train_batches": n_batches,
            "last_batch_size": p.n_train - (n_batches - 1) * cfg.batch_size,
        },
        fingerprint=req.fingerprint,
        hook_point=req.hook,
        d_model=req.cap.d_model,
        storage_dtype=req.cap.storage_dtype,
        tokenization=asdict(replace(req.tokenization, sink_norm=p.sink_norm)),
        batch_size=cfg.batch_size,
        massive_activation_policy={
            "rule": f"exclude positions < {req.exclude_first} (the attention sink of BOS-less sentences)"
            if req.exclude_first
            else "none",
            "exclude_first_positions": req.exclude_first,
            "sink_rule": f"exclude tokens with norm > {req.sink_norm_ratio:g} x the median of the rest"
            if req.sink_norm_ratio
            else "none",
            "sink_norm": p.sink_norm,
            "sink_tokens": p.n_sinks,
            "excluded_tokens": p.n_excluded,
            "excluded_share_of_squared_norm": sq_excl / max(sq_excl + sq_kept, 1e-30),
            "max_norm_excluded": max(r["max_norm_excluded"] for r in results),
            "median_norm_kept_sampled": stats["median_norm_sampled"],
        },
        split={
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "rule": "splitmix64(sentence_id, seed) / 2^53 < val_fraction",
            "val_sentence_ids_file": VAL_SENTENCE_IDS,
        },
        shuffle={
            "rule": "rows sorted by splitmix64(seed, sentence_id, position), ties by (sentence_id, position)",
            "buckets": 2**p.bits,
            "memory_gb": cfg.memory_gb,
        },
        throughput={
            "seconds": round(elapsed, 2),
            "gb_per_s": round(total_bytes / 1e9 / elapsed, 3),
            "bytes_read": total_bytes + train_bytes,
            "bytes_written": 2 * train_bytes + p.n_val * p.row_bytes,
        },
    )
