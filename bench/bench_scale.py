"""Scale harness: the pipeline's data stages at 1x, 4x, 16x of a base volume, with time, peak RSS of every
process, bytes read and written per stage, and the disk's own sequential throughput measured in the
same run.

    python bench/bench_scale.py                                   # 1M, 4M, 16M tokens at d_model 256
    python bench/bench_scale.py --tokens 250000 --scales 1 4 --work /tmp/scale

Per scale: a synthetic capture in the real shard format (written by the real ShardWriter; every token
a sum of 4 of 1,024 known unit directions, so the SAE's recovery of them is checkable) -> preprocessing
(--memory-gb well below the data) -> training on 1 process and on 2 gloo ranks (torchrun) -> top
sentences (the tests' tiny random Llama over a synthetic corpus of the same number of tokens, 1 and 2
ranks). Every stage is the real script in its own process; /proc is sampled every 0.1 s for each
process's VmHWM and storage I/O. Writes bench/results/scale.json and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from llama_3.cpu_features import cpu_name
from pipeline.capture.activations import KIND as CAPTURE_KIND
from pipeline.capture.activations import ShardWriter, TokenChunk
from pipeline.core.manifest import make_manifest, write_json_atomic

HOOK = "resid_pre.1"
SENTENCE_TOKENS = 16


# ---- measuring -----------------------------------------------------------------------------------
def descendants(root: int) -> list[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        found.append(p)
        frontier += [c for c, pp in parent.items() if pp == p]
    return found


def sample(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except (OSError, ValueError):
        return None
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
    return {
        "hwm_mb": hwm / 1024,
        "read": int(io["rchar"]),  # bytes through read(2) and friends (page cache or disk)
        "written": int(io["wchar"]),
        "disk_read": int(io["read_bytes"]),  # what reached the device
        "disk_written": int(io["write_bytes"]),
        "cmd": cmd,
    }


def run_stage(argv: list[str], torchrun: int = 0) -> dict:
    """Run a stage script; wall time, per-process peak RSS, summed storage reads / writes."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // max(torchrun, 1)))}
    cmd = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, dict] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in descendants(proc.pid):
                s = sample(pid)
                if s is not None:  # a zombie shows no VmHWM and zero I/O: keep the largest values seen
                    prev = seen.get(pid, {})
                    seen[pid] = {k: max(v, prev.get(k, v)) if k != "cmd" else v for k, v in s.items()}
            done.wait(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    log, _ = proc.communicate()
    done.set()
    thread.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:1])} failed:\n{log[-3000:]}")
    ranks = [s for s in seen.values() if "torch.distributed.run" not in s["cmd"] and s["hwm_mb"] > 50]
    return {
        "seconds": round(wall, 1),
        "peak_rss_mb_per_process": sorted(round(s["hwm_mb"]) for s in ranks),
        "read_gb": round(sum(s["read"] for s in seen.values()) / 1e9, 3),
        "written_gb": round(sum(s["written"] for s in seen.values()) / 1e9, 3),
        "disk_read_gb": round(sum(s["disk_read"] for s in seen.values()) / 1e9, 3),
        "disk_written_gb": round(sum(s["disk_written"] for s in seen.values()) / 1e9, 3),
    }


def disk_throughput(work: Path, gb: float) -> dict:
    """Sequential write (fsynced) and read of `gb` GB, the read after evicting the file from the page cache."""
    path, block = work / "throughput.bin", np.random.default_rng(0).bytes(1 << 24)
    n = max(1, int(gb * 1e9) // len(block))
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = n * len(block) / (time.perf_counter() - t) / 1e9
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    while os.read(fd, 1 << 24):
        pass
    read = n * len(block) / (time.perf_counter() - t) / 1e9
    os.close(fd)
    path.unlink()
    return {"write_gb_per_s": round(write, 3), "read_gb_per_s": round(read, 3), "gb": round(n * len(block) / 1e9, 2)}


# ---- synthetic inputs ----------------------------------------------------------------------------
def synthetic_capture(out: Path, n_tokens: int, d: int, n_true: int, seed: int) -> dict:
    """A capture folder of n_tokens bf16 rows, each the sum of 4 known directions (saved as directions.npy)."""
    out.mkdir(parents=True)
    g = np.random.default_rng(seed)
    dirs = g.standard_normal((n_true, d)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    np.save(out / "directions.npy", dirs)
    shards: list[dict] = []
    writer = ShardWriter(out, 0, [HOOK], d, torch.bfloat16, 131_072, 0, shards.append)
    t0, chunk, sid = time.perf_counter(), 65_536, 0
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        idx = g.integers(0, n_true, (n, 4))
        x = np.einsum("nk,nkd->nd", g.uniform(1, 3, (n, 4)).astype(np.float32), dirs[idx])
        x += 0.01 * g.standard_normal((n, d), dtype=np.float32)
        lengths = [SENTENCE_TOKENS] * (n // SENTENCE_TOKENS) + ([n % SENTENCE_TOKENS] if n % SENTENCE_TOKENS else [])
        ids = list(range(sid, sid + len(lengths)))
        sid += len(lengths)
        writer.put(
            TokenChunk({HOOK: torch.from_numpy(x)}, torch.zeros(n, dtype=torch.int32), ids, [0] * len(ids), lengths)
        )
    writer.close()
    m = make_manifest(
        CAPTURE_KIND,
        config={},
        inputs={"model": {"path": "synthetic", "d_model": d}, "sentences": {"path": "synthetic", "fingerprint": ""}},
        counts={"tokens": n_tokens, "sentences": sid, "bytes": sum(s["bytes"] for s in shards)},
        fingerprint=f"synthetic-{n_tokens}-{d}-{seed}",
        hook_points=[HOOK],
        d_model=d,
        storage_dtype="torch.bfloat16",
        model_dtype="torch.bfloat16",
        tokenization={"add_bos": False, "max_tokens": SENTENCE_TOKENS},
        selection={"max_sentences": 0},
        tokenizer={"sha256": "synthetic"},
        shards=[{**s, "rank": 0} for s in shards],
    )
    write_json_atomic(out / "manifest.json", m)
    gb = m["counts"]["bytes"] / 1e9
    return {"seconds": round(time.perf_counter() - t0, 1), "written_gb": round(gb, 3)}


def recovered(sae_dir: Path, capture: Path) -> float:
    """Share of the known directions some decoder row points along (cosine > 0.9)."""
    from pipeline.sae.model import TopKSae

    w = TopKSae.load(sae_dir).W_dec.detach().float().numpy()
    dirs = np.load(capture / "directions.npy")
    cos = dirs @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    return round(float((cos.max(1) > 0.9).mean()), 3)


def tiny_model_and_corpus(work: Path, n_tokens: int) -> tuple[Path, Path, Path]:
    """The tests' tiny Llama (HF dir), a random SAE at its HOOK, and a sentence dataset of ~n_tokens."""
    from llama_3 import load_model
    from pipeline.sae.model import SaeConfig, TopKSae
    from tests.tiny_checkpoints import make_hf_reference, write_hf_tokenizer

    model = work / "tiny"
    if not model.is_dir():
        reference, tok = make_hf_reference(seed=0)
        reference.save_pretrained(model)
        write_hf_tokenizer(tok, model)
    lm = load_model(model)
    torch.manual_seed(0)
    sae_dir = work / f"tiny_sae_{n_tokens}"
    TopKSae(SaeConfig(d_model=lm.args.dim, n_latents=512, k=8, hook_point=HOOK, model=lm.identity())).save(sae_dir)
    words = "the a river city king stone water light north old song field".split()
    g = np.random.default_rng(1)
    text = work / f"corpus_{n_tokens}.txt"
    with open(text, "w") as f:  # documents of 8 sentences of ~10 words (~16 tokens of the tiny BPE)
        for _ in range(max(1, n_tokens // (8 * SENTENCE_TOKENS))):
            f.write(" ".join(" ".join(g.choice(words, 10)).capitalize() + "." for _ in range(8)) + "\n\n")
    sentences = work / f"sentences_{n_tokens}"
    run_stage(
        ["openwebtext_sentences_dataset.py", "--input", str(text), "--out", str(sentences), "--splitter", "trained"]
    )
    return model, sae_dir, sentences


# ---- one scale -----------------------------------------------------------------------------------
def one_scale(work: Path, n_tokens: int, d: int, memory_gb: float, args) -> dict:
    root = work / f"n{n_tokens}"
    cap, pre = root / "capture", root / "pre"
    out = {"tokens": n_tokens, "capture_gb": round(n_tokens * d * 2 / 1e9, 3)}
    out["synthetic_capture"] = synthetic_capture(cap, n_tokens, d, args.directions, seed=0)
    out["preprocessing"] = run_stage(
        ["sae_preprocessing.py", "--capture", str(cap), "--out", str(pre), "--workers", "2"]
        + ["--memory-gb", str(memory_gb), "--batch-size", str(args.batch_size)]
    )
    train = ["sae_training.py", "--data", str(pre), "--n-latents", str(args.n_latents), "--k", str(args.k)]
    train += ["--batch-size", str(args.batch_size), "--device", "cpu", "--wandb", "disabled", "--eval-sentences", "0"]
    train += ["--dead-tokens", str(args.dead_tokens), "--val-every", "1000000000", "--checkpoint-every", "200"]
    for ranks in (1, 2):
        run_dir = root / f"sae_{ranks}"
        out[f"training_{ranks}_rank"] = run_stage(train + ["--out", str(run_dir)], torchrun=ranks if ranks > 1 else 0)
        final = json.loads((run_dir / "manifest.json").read_text())["final_validation"]
        out[f"training_{ranks}_rank"].update(
            fvu=round(final["val/fvu"], 4),
            dead_pct=round(final["val/dead_pct"], 1),
            directions_recovered=recovered(run_dir / "sae", cap),
        )
    if not args.no_top_sentences:
        model, sae_dir, sentences = tiny_model_and_corpus(root, n_tokens)
        top = ["capture_top_activating_sentences.py", "--sae", str(sae_dir), "--model", str(model)]
        top += ["--sentences", str(sentences), "--max-sentences", "0", "--device", "cpu", "--model-dtype", "float32"]
        top += ["--top-n", "20"]
        for ranks in (1, 2):
            out[f"top_sentences_{ranks}_rank"] = run_stage(
                top + ["--out", str(root / f"top_{ranks}")], torchrun=ranks if ranks > 1 else 0
            )
    return out


def table(results: list[dict]) -> str:
    stages = [k for k in results[0] if isinstance(results[0][k], dict) and "seconds" in results[0][k]]
    lines = ["| stage | " + " | ".join(f"{r['tokens'] / 1e6:g}M tokens ({r['capture_gb']} GB)" for r in results) + " |"]
    lines.append("|---" * (len(results) + 1) + "|")
    for s in stages:
        cells = []
        for r in results:
            x = r[s]
            rss = x.get("peak_rss_mb_per_process")
            io = f", {x.get('read_gb', 0):.2f} GB read / {x.get('written_gb', 0):.2f} GB written" if rss else ""
            extra = (
                f", FVU {x['fvu']}, dead {x['dead_pct']}%, recovered {x['directions_recovered']:.0%}"
                if "fvu" in x
                else ""
            )
            cells.append(f"{x['seconds']} s" + (f", RSS {'/'.join(map(str, rss))} MB" if rss else "") + io + extra)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000, help="base volume (1x)")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--directions", type=int, default=1024, help="known directions in the synthetic data")
    p.add_argument("--n-latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--dead-tokens", type=int, default=500_000)
    p.add_argument("--memory-gb", type=float, default=0.5, help="preprocessing's budget (below the data at 4x+)")
    p.add_argument("--no-top-sentences", action="store_true")
    p.add_argument("--work", default="/tmp/bench_scale")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = p.parse_args()
    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"--work {work}: exists; remove it or choose another")
    work.mkdir(parents=True)
    disk = disk_throughput(work, gb=2.0)
    results = []
    for s in args.scales:
        results.append(one_scale(work, args.tokens * s, args.d_model, args.memory_gb, args))
        print(json.dumps(results[-1]), flush=True)
    doc = {"cpu": cpu_name(), "cores": os.cpu_count(), "disk": disk, "args": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{cpu_name()}, {os.cpu_count()} cores; disk: {disk}")
    print(table(results))


if __name__ == "__main__":
    main()
