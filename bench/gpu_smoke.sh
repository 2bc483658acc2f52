#!/usr/bin/env bash
# GPU smoke run: every stage on the embedded default with --device cuda (capture and training under
# single-rank NCCL torchrun), the lines that only ever run on CUDA, and bench_llama / bench_sae in bf16.
# One command, under ~8 minutes on one H100/H200; writes gpu_smoke/results.json. CPU CI never runs it.
#
#     bash bench/gpu_smoke.sh            # from the repository root, on a machine with an NVIDIA GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_SMOKE_OUT:-gpu_smoke}
rm -rf "$OUT" && mkdir -p "$OUT"
RUNS="$OUT/runs"
RESULTS="$OUT/steps.jsonl"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to smoke-test')" \
  || exit 2
bash scripts/install.sh --test > "$OUT/install.log" 2>&1 || { echo "install failed: $OUT/install.log"; exit 2; }

step() {  # step NAME COMMAND...: run it, log it, record rc and seconds
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$RESULTS"
  [ $rc -eq 0 ] || echo "    failed (rc $rc): $OUT/$name.log"
}
torchrun1() { python -m torch.distributed.run --standalone --nproc_per_node=1 "$@"; }

step sentences python openwebtext_sentences_dataset.py --out "$RUNS/sentences" --max-documents 3000
step capture torchrun1 capture_activations.py --sentences "$RUNS/sentences" --out "$RUNS/activations" \
  --device cuda --max-sentences 8192
step preprocessing python sae_preprocessing.py --capture "$RUNS/activations" --out "$RUNS/preprocessed"
step training torchrun1 sae_training.py --data "$RUNS/preprocessed" --out "$RUNS/sae" --device cuda \
  --dead-tokens 100000 --wandb disabled
step top_sentences python capture_top_activating_sentences.py --sae "$RUNS/sae/sae" --sentences "$RUNS/sentences" \
  --out "$RUNS/top_sentences" --device cuda
step interpret_send python interpret_top_sentences_send_batches.py --top-sentences "$RUNS/top_sentences" \
  --out "$RUNS/interpretation" --offline
step interpret_retrieve python interpret_top_sentences_retrieve_batches.py --out "$RUNS/interpretation"
step interpret_parse python interpret_top_sentences_parse_responses.py --top-sentences "$RUNS/top_sentences" \
  --out "$RUNS/interpretation" --meanings "$OUT/meanings"
step steering_eval python steering_evaluation.py --sae "$RUNS/sae/sae" --top-sentences "$RUNS/top_sentences" \
  --meanings "$OUT/meanings" --out "$RUNS/steering_eval" --device cuda --n-latents 4
step inference python llama_3_inference.py --device cuda --dtype bfloat16 --max-new-tokens 16 --no-stream \
  --prompt "The capital of France is"

# The CUDA-only lines (README, "Which lines only run on CUDA"), each checked against the CPU result.
step cuda_only_lines python - <<'EOF'
import torch
from pipeline.prefetch import BatchPrefetcher
from sae import SaeConfig, TopKSae

# 1. the prefetcher's pinned, non-blocking host-to-device copy delivers the rows it read
rows = {i: torch.randn(64, 32).bfloat16() for i in range(5)}
got = [(k, r) for k, r in BatchPrefetcher(list(rows), rows.__getitem__, torch.device("cuda"))]
assert all(r.device.type == "cuda" and torch.equal(r.cpu(), rows[k]) for k, r in got)
# 2. the sparse SAE kernels (CSR matmuls, sampled_addmm) on CUDA equal the CPU's
torch.manual_seed(0)
cpu = TopKSae(SaeConfig(d_model=64, n_latents=512, k=8))
gpu = TopKSae(SaeConfig(d_model=64, n_latents=512, k=8)).cuda()
gpu.load_state_dict(cpu.state_dict())
x = torch.randn(256, 64)
for sae, xx in ((cpu, x), (gpu, x.cuda())):
    sae(xx).x_hat.pow(2).sum().backward()
for name, p in cpu.named_parameters():
    q = dict(gpu.named_parameters())[name]
    torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-4, msg=name)
print("cuda-only lines: ok")
EOF
# a training step on CUDA waits for the GPU once (its logged numbers), also while aux-k trains dead latents
step training_host_syncs python - "$RUNS/preprocessed" "$OUT/sync_run" <<'EOF'
import sys, warnings
import torch
from pipeline.distributed import DistInfo
from sae_training import TrainConfig, Trainer
cfg = TrainConfig(data=sys.argv[1], out=sys.argv[2], device="cuda", wandb="disabled", dead_tokens=4096)
t = Trainer(cfg, DistInfo(0, 1, 0, 1, torch.device("cuda")))
with torch.no_grad():
    t.sae.b_enc[: t.sae.cfg.n_latents // 2] = -1e3  # half the latents never fire: dead after 4096 tokens
counts = []
for i in range(8):
    start = i * cfg.batch_size
    rows = t.local_rows(start).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = t.train_step(start, rows)
    torch.cuda.set_sync_debug_mode("default")
    t.step += 1
    counts.append(sum("synchroniz" in str(w.message) for w in caught))
    print(f"step {i}: {counts[-1]} host syncs, dead {metrics['debug/dead_latents_ratio']:.1%}")
assert metrics["debug/dead_latents_ratio"] > 0, "no latent went dead: the check did not exercise aux-k"
assert max(counts) <= 1, counts
print("training step host syncs:", counts)
EOF
# the capture's asynchronous device-to-host copy (a CUDA event per chunk) against a CPU capture
step capture_cpu_reference python capture_activations.py --sentences "$RUNS/sentences" --out "$RUNS/activations_cpu" \
  --device cpu --model-dtype float32 --storage-dtype float32 --max-sentences 256
step capture_cuda_fp32 torchrun1 capture_activations.py --sentences "$RUNS/sentences" \
  --out "$RUNS/activations_cuda" --device cuda --model-dtype float32 --storage-dtype float32 --max-sentences 256
step capture_compare python - "$RUNS/activations_cpu" "$RUNS/activations_cuda" <<'EOF'
import sys
import torch
from pipeline.activations import CaptureOutput, load_shard
a, b = (CaptureOutput.open(d) for d in sys.argv[1:3])
for pa, pb in zip(a.shard_paths, b.shard_paths):
    x, y = load_shard(pa), load_shard(pb)
    assert torch.equal(x["token_ids"], y["token_ids"]) and torch.equal(x["sentence_ids"], y["sentence_ids"])
    key = f"act.{a.hook_points[0]}"
    rel = (x[key] - y[key]).norm() / x[key].norm()
    assert rel < 1e-3, rel
print("CUDA capture equals the CPU capture (fp32, relative error < 1e-3)")
EOF

step bench_llama python bench/bench_llama.py --device cuda --dtype bfloat16 --batch-size 64 --json "$OUT/bench_llama.json"
step bench_sae python bench/bench_sae.py --data "$RUNS/preprocessed" --device cuda --only ours_fp32 ours_bf16 \
  sparsify_adam_fp32
cp bench/results/bench_sae.json "$OUT/bench_sae.json" 2>/dev/null

python - "$OUT" <<'EOF'
import json, sys, subprocess
from pathlib import Path
out = Path(sys.argv[1])
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                     text=True).stdout.strip()
doc = {"gpu": gpu, "steps": steps, "failed": [s["step"] for s in steps if s["rc"]]}
for name in ("bench_llama", "bench_sae"):
    p = out / f"{name}.json"
    doc[name] = json.loads(p.read_text()) if p.is_file() else None
(out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
print(json.dumps({"gpu": gpu, "failed": doc["failed"], "seconds": sum(s["seconds"] for s in steps)}))
sys.exit(1 if doc["failed"] else 0)
EOF
