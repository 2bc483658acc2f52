"""Benchmark SAE training against EleutherAI's sparsify on the same cached activations.

    pip install -e .[bench]                  # the peer, eai-sparsify 1.3.3 (+ accelerate, einops, schedulefree, ...)
    python bench/bench_sae.py [--data runs/preprocessed] [--n-latents 4608] [--k 32] [--batch-size 4096]
                              [--epochs 1] [--converge-epochs 5] [--threads 2]

Every contender runs in its own process (its peak RSS is its own) with the same threads, the same
glibc malloc settings and the same global batches (rows in the order `sae_training.batch_order`
gives), and is scored on the same held-out rows: FVU in the raw activation space and the share of
latents that never fire on them. Contenders:

- ours fp32 / ours bf16: `sae_training.Trainer.train_step` (the real trainer, aux-k on) with
  --autocast off / on;
- sparsify Adam: its `SparseCoder` driven the way its Trainer drives it (b_dec = first batch's mean,
  unit-norm decoder, FVU + auxk_alpha * auxk loss, parallel gradient removed, torch Adam with its
  default lr and a linear warmup/decay schedule). Its Trainer has no cached-activation path, so this
  is that loop on cached rows. Its bf16 autocast is CUDA-only, so on CPU it runs fp32;
- sparsify Adam at our lr: the same with our default peak lr (its own default is 10x lower);
- sparsify signum: the same with its default optimizer (schedule-free SignSGD), for FVU at
  convergence after --converge-epochs passes (against ours with its defaults).

Both use aux-k with coefficient 1/32 and the same dead threshold, so the work per step matches.
Also reported: the encoder matmul's throughput on this machine (fp32 and bf16) and the fraction of
it each contender reaches (the [N, d] x [d, L] encoder matmul is the step's dominant cost).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from llama_3.cpu_features import cpu_name, has_native_bf16, missing_bf16_feature
from pipeline.core.distributed import DistInfo
from pipeline.core.runtime import tune_glibc_malloc
from pipeline.preprocessing.preprocessed import PreprocessedOutput
from pipeline.sae.config import TrainConfig
from pipeline.sae.training import Trainer, batch_order

AUX_COEF, DEAD_TOKENS = 1 / 32, 100_000
DEVICE = torch.device("cpu")  # --device


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def score(reconstruct, val: torch.Tensor, n_latents: int, indices_of) -> dict:
    """FVU in the raw space and % of latents silent on every held-out row."""
    x = val[0 : len(val)].float().to(DEVICE)  # a tensor or the trainer's RowReader
    mean = x.double().mean(0)
    sq_err, total, fired = 0.0, 0.0, torch.zeros(n_latents, dtype=torch.bool)
    for a in range(0, len(x), 4096):
        xb = x[a : a + 4096]
        sq_err += (reconstruct(xb).double() - xb.double()).pow(2).sum().item()
        total += (xb.double() - mean).pow(2).sum().item()
        values, idx = indices_of(xb)
        fired[idx[values > 0].cpu()] = True
    return {"fvu": sq_err / total, "dead_pct": 100 * (~fired).float().mean().item()}


def run_ours(args, autocast: str, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=args.data,
            out=tmp,
            n_latents=args.n_latents,
            k=args.k,
            batch_size=args.batch_size,
            epochs=epochs,
            warmup_steps=args.warmup_steps,
            lr=args.lr,
            beta1=args.beta1,
            beta2=args.beta2,
            aux_coef=AUX_COEF,
            dead_tokens=DEAD_TOKENS,
            autocast=autocast,
            device=str(DEVICE),
            wandb="disabled",
            eval_sentences=0,
        )
        base = rss_mb()
        t = Trainer(cfg, DistInfo(0, 1, 0, 1, DEVICE))
        seconds, tokens = 0.0, 0
        for epoch in range(epochs):
            for start in batch_order(len(t.train), args.batch_size, cfg.seed, epoch):
                s = time.perf_counter()
                t.train_step(int(start))
                seconds += time.perf_counter() - s
                t.step += 1
                tokens += min(args.batch_size, len(t.train) - int(start))
        sae = t.sae

        def indices_of(x):
            out = sae(x)
            return out.values, out.indices

        result = score(sae.reconstruct, t.val, args.n_latents, indices_of)
        return {
            **result,
            "tokens_per_s": tokens / seconds,
            "tokens": tokens,
            "peak_rss_mb": rss_mb(),
            "rss_before_setup_mb": base,
        }


def run_sparsify(args, optimizer: str, epochs: int, lr: float = 0.0) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    base = rss_mb()
    data = PreprocessedOutput.open(args.data)
    train, val = data.activations("train"), data.activations("val")
    d = train.shape[1]
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=args.n_latents, k=args.k), device=DEVICE, dtype=torch.float32)
    steps = epochs * math.ceil(len(train) / args.batch_size)
    if optimizer == "adam":
        opt = torch.optim.Adam(sae.parameters(), lr=lr or 2e-4 / (args.n_latents / 2**14) ** 0.5)
        sched = get_linear_schedule_with_warmup(opt, args.warmup_steps, steps)
    else:  # sparsify's default: schedule-free SignSGD
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / (args.n_latents / 2**14) ** 0.5), momentum=0.95)
        opt.train()
        sched = None
    since_fired = torch.zeros(args.n_latents, dtype=torch.long, device=DEVICE)
    seconds, tokens, step = 0.0, 0, 0
    for epoch in range(epochs):
        for start in batch_order(len(train), args.batch_size, 0, epoch):
            x = train[int(start) : int(start) + args.batch_size]
            s = time.perf_counter()
            x = x.to(DEVICE).float()
            if step == 0:
                sae.b_dec.data = x.mean(0)
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x, dead_mask=since_fired > DEAD_TOKENS)
            (out.fvu + AUX_COEF * out.auxk_loss).backward()
            fired = torch.zeros(args.n_latents, dtype=torch.bool, device=DEVICE)
            fired[out.latent_indices.flatten()] = True
            since_fired += len(x)
            since_fired[fired] = 0
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
            seconds += time.perf_counter() - s
            tokens, step = tokens + len(x), step + 1
    if sched is None:
        opt.eval()  # schedule-free: evaluate the averaged weights
    sae.set_decoder_norm_to_unit_norm()

    def indices_of(x):
        enc = sae.encode(x)
        return enc.top_acts, enc.top_indices

    result = score(lambda x: sae(x).sae_out, val, args.n_latents, indices_of)
    return {
        **result,
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "peak_rss_mb": rss_mb(),
        "rss_before_setup_mb": base,
    }


def matmul_gflops(n: int, d: int, n_latents: int, dtype: torch.dtype) -> float:
    from pipeline.sae.model import encoder_preacts

    x, W, b = (
        torch.randn(n, d, dtype=dtype, device=DEVICE),
        torch.randn(n_latents, d, dtype=dtype, device=DEVICE),
        torch.zeros(n_latents, dtype=dtype, device=DEVICE),
    )
    best = math.inf
    for _ in range(10):
        s = time.perf_counter()
        encoder_preacts(x, W, b)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - s)
    return 2 * n * d * n_latents / best / 1e9


WORKERS = {
    "ours_fp32": lambda a: run_ours(a, "off", a.epochs),
    "ours_bf16": lambda a: run_ours(a, "on", a.epochs),
    "sparsify_adam_fp32": lambda a: run_sparsify(a, "adam", a.epochs),
    "sparsify_adam_fp32_our_lr": lambda a: run_sparsify(
        a, "adam", a.epochs, a.lr or 2e-3 / (a.n_latents / 2**14) ** 0.5
    ),
    "ours_default_converged": lambda a: run_ours(a, "auto", a.converge_epochs),
    "sparsify_signum_converged": lambda a: run_sparsify(a, "signum", a.converge_epochs),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO / "runs" / "preprocessed"))
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--converge-epochs", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.0, help="our peak lr (0: the trainer's default)")
    p.add_argument("--beta1", type=float, default=0.85)
    p.add_argument("--beta2", type=float, default=0.9999)
    p.add_argument("--only", nargs="*", default=list(WORKERS))
    p.add_argument("--device", default="cpu", help="cpu or cuda (both contenders on it)")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    tune_glibc_malloc()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    d = PreprocessedOutput.open(args.data).d_model
    results = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "only")},
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_name(),
        "native_bf16": has_native_bf16(),
        "encoder_matmul_gflops": {
            "fp32": matmul_gflops(args.batch_size, d, args.n_latents, torch.float32),
            "bf16": matmul_gflops(args.batch_size, d, args.n_latents, torch.bfloat16),
        },
    }
    flops_per_token = 2 * d * args.n_latents
    for name in args.only:
        if name == "ours_bf16" and DEVICE.type == "cpu" and not has_native_bf16():
            # Emulated bf16 runs several times slower than fp32: nothing a user would choose to measure.
            results[name] = {"skipped": missing_bf16_feature()}
            print(f"{name:28s} skipped: {missing_bf16_feature()}", flush=True)
            continue
        cmd = [sys.executable, __file__, "--worker", name] + [
            a for a in sys.argv[1:] if a != "--only" and a not in args.only
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            results[name] = {"failed": last}
            print(f"{name:28s} failed: {last}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ran_bf16 = name == "ours_bf16" or name == "ours_default_converged" and has_native_bf16()  # autocast auto
        peak = results["encoder_matmul_gflops"]["bf16" if ran_bf16 else "fp32"]
        r["fraction_of_matmul_peak"] = r["tokens_per_s"] * flops_per_token / 1e9 / peak
        results[name] = r
        print(
            f"{name:28s} {r['tokens_per_s']:8.0f} tok/s  FVU {r['fvu']:.4f}  dead {r['dead_pct']:5.1f}%  "
            f"peak RSS {r['peak_rss_mb']:6.0f} MB (+{r['peak_rss_mb'] - r['rss_before_setup_mb']:.0f})  "
            f"{r['fraction_of_matmul_peak']:.0%} of matmul peak",
            flush=True,
        )
    for ours, key in (("ours_bf16", "speedup_bf16_vs_sparsify"), ("ours_fp32", "speedup_fp32_vs_sparsify")):
        if "tokens_per_s" in results.get(ours, {}) and "tokens_per_s" in results.get("sparsify_adam_fp32", {}):
            results[key] = results[ours]["tokens_per_s"] / results["sparsify_adam_fp32"]["tokens_per_s"]
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_sae.json").write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {k: v for k, v in results.items() if k.startswith("speedup") or k == "encoder_matmul_gflops"}, indent=2
        )
    )


if __name__ == "__main__":
    main()
