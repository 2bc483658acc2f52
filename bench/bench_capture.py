"""Benchmark capture: our capture-only forward against Hugging Face transformers on SmolLM2.

    python bench/bench_capture.py [--sentences runs/sentences] [--n-sentences 1024]

Same sentences (the first N of the dataset, cut to 64 tokens), same CPU, same process and the same
glibc malloc setting for everyone. Tokens/s count real text tokens only (no padding, no BOS).
  A. transformers as a user would run it: corpus order, batches of 32, padded, full forward, fp32
  B. transformers given our advantages: our length-sorted batches, forward cut at the layer, fp32 / bf16
  C. ours: the same length-sorted batches, capture-only forward, fp32 / bf16
  D. the limit: FLOPs of the blocks actually run / measured matmul FLOP/s of this CPU, per dtype
Also reports what bf16 costs in accuracy against fp32 activations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_llama import to_transformers
from llama_3 import default_capture_layer, load_model
from llama_3.cpu_fast import apply_cpu_fast_paths
from llama_3.cpu_features import cpu_name, has_native_bf16, missing_bf16_feature
from pipeline.core.runtime import tune_glibc_malloc
from pipeline.sentences.dataset import SentenceTokenDataset, iter_sentences

MAX_TOKENS = 64


def matmul_flops_per_s(dtype: torch.dtype, m: int = 4096, k: int = 576, n: int = 1536) -> float:
    """The best of F.linear and oneDNN with a prepacked weight, on a block-sized product."""
    from llama_3.cpu_fast import PackedLinear
    from llama_3.cpu_features import can_prepack

    a = torch.randn(m, k, dtype=dtype)
    plain = torch.nn.Linear(k, n, bias=False).to(dtype)
    best = 0.0
    with torch.inference_mode():
        for lin in (plain, PackedLinear(plain)) if can_prepack(dtype) else (plain,):
            for _ in range(3):
                lin(a)
            t, reps = time.perf_counter(), 20
            for _ in range(reps):
                lin(a)
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def flops_per_token(args, n_blocks: int, mean_len: float) -> float:
    """Matmul FLOPs per token of n_blocks: projections + SwiGLU + attention scores/values (causal, half)."""
    d, hd = args.dim, args.head_dim
    proj = d * args.n_heads * hd + 2 * d * args.n_kv_heads * hd + args.n_heads * hd * d
    ffn = 3 * d * args.hidden_dim
    attn = 2 * args.n_heads * hd * mean_len / 2  # QK^T and PV over on average half the sequence
    return n_blocks * 2 * (proj + ffn + attn)


def timed(fn, warmup, repeats: int = 1) -> float:
    """Best of `repeats` timed passes after a short warm-up (a couple of batches, not a whole pass)."""
    warmup()
    return min(_once(fn) for _ in range(repeats))


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", default=str(REPO / "runs" / "sentences"))
    p.add_argument("--n-sentences", type=int, default=768)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    tune_glibc_malloc()
    torch.manual_seed(0)

    results: dict = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "fast_bf16": has_native_bf16()}}
    # Emulated bf16 (no AVX-512 BF16 / AMX) runs several times slower than fp32: reported as skipped.
    dtypes = (torch.float32, torch.bfloat16) if has_native_bf16() else (torch.float32,)
    if not has_native_bf16():
        results["bf16"] = f"skipped: {missing_bf16_feature()}"
    models = {dt: load_model(None, dtype=dt) for dt in dtypes}
    lm = models[torch.float32]
    L = default_capture_layer(lm.args.n_layers)
    hook = f"resid_pre.{L}"
    tok = lm.tokenizer

    # Length-sorted batches exactly as the capture stage makes them.
    ds = SentenceTokenDataset(args.sentences, tok, max_tokens=MAX_TOKENS, max_sentences=args.n_sentences)
    sorted_batches = list(ds)
    n_tokens = sum(b.n_tokens for b in sorted_batches)
    # Corpus-order batches of 32 as a transformers user would pad them.
    texts = []
    for part in iter_sentences(args.sentences):
        texts += part["text"]
        if len(texts) >= args.n_sentences:
            break
    ids = [t[:MAX_TOKENS] for t in tok.encode_batch(texts[: args.n_sentences], bos=False)]
    assert sum(map(len, ids)) == n_tokens
    naive = []
    for i in range(0, len(ids), 32):
        chunk = ids[i : i + 32]
        T = max(map(len, chunk))
        naive.append(
            (
                torch.tensor([c + [tok.pad_id] * (T - len(c)) for c in chunk]),
                torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in chunk]),
            )
        )
    padded = sum(t.numel() for t, _ in naive)
    results["data"] = {
        "sentences": len(ids),
        "tokens": n_tokens,
        "naive_padding_fraction": round(1 - n_tokens / padded, 3),
        "sorted_padding_fraction": round(1 - n_tokens / sum(b.tokens.numel() for b in sorted_batches), 3),
    }

    rates = {}
    with torch.inference_mode():
        hf32 = to_transformers(lm)

        def hf_naive(batches=naive):
            for t, m in batches:
                hf32(input_ids=t, attention_mask=m, output_hidden_states=True)

        rates["A: transformers, user-style, fp32"] = n_tokens / timed(hf_naive, lambda: hf_naive(naive[:2]))
        hf32 = None  # free it (the closures above have run)
        for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))[: len(dtypes)]:
            hf = to_transformers(models[dt])  # from the plain weights
            ours = models[dt].model
            apply_cpu_fast_paths(ours)  # as capture_activations.py does on CPU
            hf.model.layers = hf.model.layers[:L]  # cut at the layer: blocks 0..L-1, as ours
            grabbed = {}
            hf.model.layers[L - 1].register_forward_hook(
                lambda m, i, o: grabbed.__setitem__("x", o[0] if isinstance(o, tuple) else o)
            )

            def hf_sorted(batches=sorted_batches):
                for b in batches:
                    T = b.tokens.shape[1]
                    mask = (torch.arange(T)[None] < b.lengths[:, None]).long()
                    hf.model(input_ids=b.tokens, attention_mask=mask)

            def ours_sorted(batches=sorted_batches):
                for b in batches:
                    ours.capture(b.tokens, [hook])

            # Same hidden state from both before timing.
            b = sorted_batches[len(sorted_batches) // 2]
            mask = torch.arange(b.tokens.shape[1])[None] < b.lengths[:, None]
            hf.model(input_ids=b.tokens, attention_mask=mask.long())
            a_ref, a_ours = grabbed["x"][mask].float(), ours.capture(b.tokens, [hook])[hook][mask].float()
            rel = ((a_ref - a_ours).norm(dim=-1) / a_ref.norm(dim=-1)).median().item()
            assert rel < (1e-5 if dt == torch.float32 else 0.05), rel
            reps = 1 if dt == torch.float32 else 3
            warm = sorted_batches[-2:]  # the longest batches
            rates[f"B: transformers, sorted + cut at layer, {name}"] = n_tokens / timed(
                hf_sorted, lambda: hf_sorted(warm), reps
            )
            rates[f"C: ours, {name}"] = n_tokens / timed(ours_sorted, lambda: ours_sorted(warm), reps)
            mean_len = sum(b.tokens.shape[1] * b.n_tokens for b in sorted_batches) / n_tokens
            limit = matmul_flops_per_s(dt) / flops_per_token(lm.args, L, mean_len)
            rates[f"D: limit (FLOPs / matmul FLOP/s), {name}"] = limit
            hf = None  # free it before the next dtype

        # What bf16 costs: per-token relative error of bf16 activations against fp32.
        errs, coss = [], []
        for b in sorted_batches[:: max(1, len(sorted_batches) // 8)] if torch.bfloat16 in models else []:
            mask = torch.arange(b.tokens.shape[1])[None] < b.lengths[:, None]
            a32 = models[torch.float32].model.capture(b.tokens, [hook])[hook][mask]
            a16 = models[torch.bfloat16].model.capture(b.tokens, [hook])[hook][mask].float()
            errs += ((a16 - a32).norm(dim=-1) / a32.norm(dim=-1)).tolist()
            coss += torch.nn.functional.cosine_similarity(a16, a32, dim=-1).tolist()
    errs.sort()
    if errs:
        results["bf16_accuracy"] = {
            "median_rel_error": errs[len(errs) // 2],
            "p99_rel_error": errs[int(len(errs) * 0.99)],
            "min_cosine": min(coss),
        }
    results["tokens_per_s"] = {k: round(v) for k, v in rates.items()}
    a = rates["A: transformers, user-style, fp32"]
    results["ratios"] = {}
    for name in ("fp32", "bf16")[: len(dtypes)]:
        ours = rates[f"C: ours, {name}"]
        results["ratios"].update(
            {
                f"ours {name} / A": ours / a,
                f"ours {name} / B {name}": ours / rates[f"B: transformers, sorted + cut at layer, {name}"],
                f"ours {name} / limit": ours / rates[f"D: limit (FLOPs / matmul FLOP/s), {name}"],
            }
        )
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
