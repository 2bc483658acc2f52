#!/usr/bin/env bash
# GPU smoke run: every stage on the embedded default with --device cuda — capture, training and top sentences under
# torchrun with a forced NCCL group of one (PIPELINE_FORCE_PROCESS_GROUP=1: every collective runs) and, on a box
# with >= 2 GPUs, as 2-rank NCCL runs too —, top sentences from the capture and from the model, the steering
# evaluation, inference and the Gradio page's session with an SAE; the lines that only ever run on CUDA; a
# users'-size memory check (a 49,152 x 3,072 SAE with aux-k at batch 8,192); bench_llama / bench_sae in bf16.
# One command from a fresh GPU box (no sudo, no browser), per-step timeouts, ~10 minutes on one H100/H200 with
# the install; writes gpu_smoke/results.json. CPU CI never runs it; tests/end_to_end/test_gpu_smoke_commands.py parses
# every stage command below with that stage's own parser.
#
#     bash bench/gpu_smoke.sh            # from the repository root, on a machine with an NVIDIA GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_SMOKE_OUT:-gpu_smoke}
rm -rf "$OUT" && mkdir -p "$OUT"
RUNS="$OUT/runs"
RESULTS="$OUT/steps.jsonl"
export PIPELINE_FORCE_PROCESS_GROUP=1 PIPELINE_DIST_TIMEOUT_S=300 WANDB_MODE=disabled

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to smoke-test')" \
  || exit 2
# the runtime install and the benches' peers (transformers, sparsify); no test extras: no browser, no sudo
{ bash scripts/install.sh && python -m pip install -q -e ".[bench]"; } > "$OUT/install.log" 2>&1 \
  || { echo "install failed: $OUT/install.log"; exit 2; }
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")

step() {  # step NAME SECONDS COMMAND...: run it under a timeout, log it, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$RESULTS"
  [ $rc -eq 0 ] || echo "    failed (rc $rc): $OUT/$name.log"
}
torchrun1() { python -m torch.distributed.run --standalone --nproc_per_node=1 "$@"; }
torchrun2() { python -m torch.distributed.run --standalone --nproc_per_node=2 "$@"; }

step sentences 120 python openwebtext_sentences_dataset.py --out "$RUNS/sentences" --max-documents 3000
step capture 300 torchrun1 capture_activations.py --sentences "$RUNS/sentences" --out "$RUNS/activations" \
  --device cuda --max-sentences 8192
step preprocessing 120 python sae_preprocessing.py --capture "$RUNS/activations" --out "$RUNS/preprocessed"
step training 300 torchrun1 sae_training.py --data "$RUNS/preprocessed" --out "$RUNS/sae" --device cuda \
  --dead-tokens 100000 --wandb disabled
# --deterministic: two runs give the same bits; the default run's distance from them is CUDA's run-to-run tolerance
step training_det_a 300 torchrun1 sae_training.py --data "$RUNS/preprocessed" --out "$RUNS/sae_det_a" --device cuda \
  --dead-tokens 100000 --wandb disabled --eval-sentences 0 --deterministic
step training_det_b 300 torchrun1 sae_training.py --data "$RUNS/preprocessed" --out "$RUNS/sae_det_b" --device cuda \
  --dead-tokens 100000 --wandb disabled --eval-sentences 0 --deterministic
step training_det_compare 60 python - "$RUNS" "$OUT/deterministic.json" <<'EOF'
import json, sys
from safetensors.torch import load_file
runs = sys.argv[1]
a, b, default = (load_file(f"{runs}/{r}/sae/sae.safetensors") for r in ("sae_det_a", "sae_det_b", "sae"))
doc = {"deterministic_runs_equal": all(bool((a[k] == b[k]).all()) for k in a),
       "default_vs_deterministic_rel": {k: float((default[k] - a[k]).norm() / a[k].norm()) for k in a}}
json.dump(doc, open(sys.argv[2], "w"))
print(doc)
assert doc["deterministic_runs_equal"]
EOF
step top_sentences 300 torchrun1 capture_top_activating_sentences.py --sae "$RUNS/sae/sae" \
  --sentences "$RUNS/sentences" --out "$RUNS/top_sentences" --device cuda --source capture
step top_sentences_model 300 torchrun1 capture_top_activating_sentences.py --sae "$RUNS/sae/sae" \
  --sentences "$RUNS/sentences" --out "$RUNS/top_sentences_model" --device cuda --source model --max-sentences 2048
if [ "$GPUS" -ge 2 ]; then  # what only a 2-rank NCCL run meets: collectives across GPUs, ranks off cuda:0
  step capture_2gpu 300 torchrun2 capture_activations.py --sentences "$RUNS/sentences" \
    --out "$RUNS/activations_2gpu" --device cuda --max-sentences 2048
  step training_2gpu 300 torchrun2 sae_training.py --data "$RUNS/preprocessed" --out "$RUNS/sae_2gpu" --device cuda \
    --dead-tokens 100000 --wandb disabled --eval-sentences 0
  step top_sentences_2gpu 300 torchrun2 capture_top_activating_sentences.py --sae "$RUNS/sae/sae" \
    --sentences "$RUNS/sentences" --out "$RUNS/top_sentences_2gpu" --device cuda --source model --max-sentences 2048
fi
step interpret_send 120 python interpret_top_sentences_send_batches.py --top-sentences "$RUNS/top_sentences" \
  --out "$RUNS/interpretation" --offline
step interpret_retrieve 60 python interpret_top_sentences_retrieve_batches.py --out "$RUNS/interpretation"
step interpret_parse 300 python interpret_top_sentences_parse_responses.py --top-sentences "$RUNS/top_sentences" \
  --out "$RUNS/interpretation" --meanings "$OUT/meanings"
step steering_eval 300 python steering_evaluation.py --sae "$RUNS/sae/sae" --top-sentences "$RUNS/top_sentences" \
  --meanings "$OUT/meanings" --out "$RUNS/steering_eval" --device cuda --n-candidates 4
step inference 120 python llama_3_inference.py --device cuda --dtype bfloat16 --max-new-tokens 16 --no-stream \
  --prompt "The capital of France is" --sae "$RUNS/sae/sae" --meanings "$OUT/meanings" --steer 3:h_bias:4 --compare \
  --inspect 3
step gradio_session 120 python - "$RUNS/sae/sae" "$OUT/meanings" <<'EOF'
import sys
from pipeline.steering.output_score import promoted_tokens
from pipeline.steering.splice import SteeringEntry
from pipeline.steering.session import Session
from pipeline.steering.vectors import sae_directions
s = Session.open(None, sys.argv[1], sys.argv[2], "cuda", "auto")  # what the Gradio page's callbacks call
entries = [SteeringEntry(3, "h_bias", 4.0)]
pairs = s.complete(s.text_prompts(["The river"]), entries, max_new_tokens=8, temperature=0.0)
for _ in s.stream(s.text_prompts(["A"]), entries, max_new_tokens=4, temperature=0.7):
    pass
print(s.inspect(pairs[0][1], entries, "all", 3)[0])
print(promoted_tokens(s.loaded.model, sae_directions(s.steerable.sae, [1, 2]), 5))
EOF
# users' size: Llama 3.2-3B's d_model, 16x latents, aux-k with half the latents dead, batch 8,192: peak GPU memory
step users_size_memory 180 python - "$OUT/users_size_memory.json" <<'EOF'
import json, sys, time
import torch
from sae import SaeConfig, TopKSae
from sae_training import aux_k_loss
torch.manual_seed(0)
sae = TopKSae(SaeConfig(d_model=3072, n_latents=49152, k=32)).cuda()
opt = torch.optim.AdamW(sae.parameters(), lr=1e-4)
dead = torch.zeros(49152, dtype=torch.bool, device="cuda")
dead[::2] = True
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(3):
    x = torch.randn(8192, 3072, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sae(x)
        loss = (out.x_hat_norm.float() - out.x_norm).pow(2).sum() / len(x)
        aux = aux_k_loss(sae, out.x_norm, out.x_hat_norm.float(), dead, 1536, float(len(x)), int(dead.sum()))
    opt.zero_grad(set_to_none=True)
    (loss + aux / 32).backward()
    opt.step()
torch.cuda.synchronize()
doc = {"d_model": 3072, "n_latents": 49152, "k": 32, "k_aux": 1536, "batch": 8192,
       "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
       "s_per_step": round((time.perf_counter() - t0) / 3, 3)}
json.dump(doc, open(sys.argv[1], "w"))
print(doc)
EOF

# The CUDA-only lines (README, "Which lines only run on CUDA"), each checked against the CPU result.
step cuda_only_lines 120 python - <<'EOF'
import torch
from pipeline.core.prefetch import BatchPrefetcher
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
step training_host_syncs 120 python - "$RUNS/preprocessed" "$OUT/sync_run" <<'EOF'
import sys, warnings
import torch
from pipeline.core.distributed import DistInfo
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
step capture_cpu_reference 180 python capture_activations.py --sentences "$RUNS/sentences" --out "$RUNS/activations_cpu" \
  --device cpu --model-dtype float32 --storage-dtype float32 --max-sentences 256
step capture_cuda_fp32 180 torchrun1 capture_activations.py --sentences "$RUNS/sentences" \
  --out "$RUNS/activations_cuda" --device cuda --model-dtype float32 --storage-dtype float32 --max-sentences 256
step capture_compare 60 python - "$RUNS/activations_cpu" "$RUNS/activations_cuda" <<'EOF'
import sys
import torch
from pipeline.capture.activations import CaptureOutput, load_shard
a, b = (CaptureOutput.open(d) for d in sys.argv[1:3])
for pa, pb in zip(a.shard_paths, b.shard_paths):
    x, y = load_shard(pa), load_shard(pb)
    assert torch.equal(x["token_ids"], y["token_ids"]) and torch.equal(x["sentence_ids"], y["sentence_ids"])
    key = f"act.{a.hook_points[0]}"
    rel = (x[key] - y[key]).norm() / x[key].norm()
    assert rel < 1e-3, rel
print("CUDA capture equals the CPU capture (fp32, relative error < 1e-3)")
EOF

step bench_llama 300 python bench/bench_llama.py --device cuda --dtype bfloat16 --batch-size 64 --json "$OUT/bench_llama.json"
step bench_sae 300 python bench/bench_sae.py --data "$RUNS/preprocessed" --device cuda --only ours_fp32 ours_bf16 \
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
for name in ("bench_llama", "bench_sae", "users_size_memory", "deterministic"):
    p = out / f"{name}.json"
    doc[name] = json.loads(p.read_text()) if p.is_file() else None
(out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
print(json.dumps({"gpu": gpu, "failed": doc["failed"], "seconds": sum(s["seconds"] for s in steps)}))
sys.exit(1 if doc["failed"] else 0)
EOF
