"""Every stage as it runs on a GPU, on the CPU: the model and SAE on an emulated CUDA device
(pipeline/core/device_check.py),
every collective checked against NCCL's rules and recorded, a process group even for one process, and 2-rank runs
whose ranks must run the same collectives. What a CUDA / NCCL run enforces fails here first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.core.device_check import rank_sequences
from tests.collective_log import REPO, assert_ranks_agree, collective_env


def emulated_env(log_dir: Path, **extra) -> dict:
    return {
        **os.environ,
        **collective_env(log_dir),
        "PIPELINE_DEVICE_CHECK": "cuda",
        "PIPELINE_FORCE_PROCESS_GROUP": "1",
        "PIPELINE_DIST_TIMEOUT_S": "120",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        **extra,
    }


def run_stage(root: Path, log_dir: Path, script: str, args: list[str], ranks: int = 0, **extra):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*(launch if ranks else [sys.executable]), str(REPO / script), *args]
    done = subprocess.run(
        cmd, cwd=root, env=emulated_env(log_dir, **extra), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{script}: {done.stdout[-2000:]}{done.stderr[-4000:]}"
    return done


# ---- the emulation itself, against what CUDA does --------------------------------------------------------------
def run_emulated(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=emulated_env(tmp_path / "log"), capture_output=True, text=True, timeout=120
    )


def test_emulated_device_refuses_what_cuda_refuses(tmp_path):
    code = """
import torch
from pipeline.core.device_check import DeviceMismatch
torch.cuda.set_device(0)
x = torch.randn(4, 3).cuda()
assert x.device == torch.device("cuda", 0) and (x * 2).device.type == "cuda"
assert (x + torch.tensor(1.0)).device.type == "cuda"          # a CPU 0-dim scalar: CUDA takes it
assert x[torch.tensor([0, 2])].device.type == "cuda"         # CPU indices: CUDA moves them
assert x.cpu().device.type == "cpu" and x.sum().item() == x.cpu().sum().item()
for bad in (lambda: x + torch.randn(4, 3), lambda: torch.stack([x[0], torch.zeros(3)]),
            lambda: torch.randn(3, 3) @ x.t(), lambda: x.numpy()):
    try:
        bad()
    except (DeviceMismatch, RuntimeError) as e:
        print("refused:", type(e).__name__)
    else:
        raise SystemExit("not refused")
m = torch.nn.Linear(3, 2).to("cuda")
m(x).sum().backward()
assert m.weight.grad.device.type == "cuda"
"""
    done = run_emulated(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("refused:") == 4


def test_collective_checks_refuse_what_nccl_refuses(tmp_path):
    code = """
import os, torch, torch.distributed as dist
from pipeline.core.device_check import CollectiveMismatch
from pipeline.core.distributed import setup_distributed
info = setup_distributed("cuda")
assert dist.is_initialized() and info.distributed and info.world_size == 1
ok = torch.ones(4, device="cuda")
dist.all_reduce(ok)
for bad in (torch.ones(4), torch.ones(4, 2, device="cuda").t(), torch.ones(4, device="cuda", dtype=torch.bool)):
    try:
        dist.all_reduce(bad)
    except CollectiveMismatch as e:
        print("refused:", e)
"""
    done = run_emulated(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("refused:") == 3, done.stdout
    assert [r["op"] for r in rank_sequences(tmp_path / "log")[0]] == ["all_reduce"]


def test_object_collective_needs_set_device(tmp_path):
    code = (
        """
import torch, torch.distributed as dist
from pipeline.core.device_check import CollectiveMismatch
dist.init_process_group("gloo", init_method="file://%s/store", world_size=1, rank=0)
try:
    dist.gather_object({"a": 1}, [None], dst=0)
except CollectiveMismatch:
    print("refused")
torch.cuda.set_device(0)
out = [None]
dist.gather_object({"a": 1}, out, dst=0)
print(out)
"""
        % tmp_path
    )
    done = run_emulated(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["refused", "[{'a':", "1}]"]


def test_writer_thread_without_set_device_is_refused(tmp_path):
    """The capture's shard writer waits on CUDA events on its own thread: without set_device there, ranks > 0
    open a context on GPU 0 (the emulation refuses it; pipeline.core.runtime.set_thread_device fixes it)."""
    code = """
import threading, torch
from pipeline.core.device_check import DeviceMismatch
from pipeline.core.runtime import set_thread_device
torch.cuda.set_device(1)
def wait(fix):
    if fix:
        set_thread_device(torch.device("cuda", 1))
    try:
        torch.cuda.Event().synchronize()
        print("ok")
    except DeviceMismatch:
        print("refused")
for fix in (False, True):
    t = threading.Thread(target=wait, args=(fix,)); t.start(); t.join()
"""
    done = run_emulated(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["refused", "ok"]


# ---- every stage on the emulated device -------------------------------------------------------------------------
@pytest.mark.slow
def test_every_stage_runs_on_the_emulated_device(tiny_pipeline, tmp_path):
    """capture (one process with a forced group, and 2 ranks), training and top sentences from the capture and
    from the model (2 ranks), the steering evaluation, inference with an SAE and the Gradio page's session: all
    with --device cuda under the emulation; each rank's collectives the same; top sentences equal the CPU run's."""
    root, plan, _, _ = tiny_pipeline
    sae_dir = str(root / "runs" / "sae" / "sae")  # the SAE names its model
    hf = json.loads((root / "runs" / "activations" / "manifest.json").read_text())["inputs"]["model"]["path"]
    out = tmp_path / "out"

    logs = tmp_path / "capture1"
    common = ["--sentences", "runs/sentences", "--model", hf, "--device", "cuda", "--model-dtype", "float32"]
    common += ["--shard-tokens", "1500", "--max-batch-tokens", "512", "--max-sentences", "0"]
    run_stage(root, logs, "capture_activations.py", [*common, "--out", str(out / "act1")])
    # a group of one still runs the capture's collectives: the folder check's all_gather and the barriers
    assert {r["op"] for r in rank_sequences(logs)[0]} == {"barrier", "all_gather"}
    logs = tmp_path / "capture2"
    run_stage(root, logs, "capture_activations.py", [*common, "--out", str(out / "act2")], ranks=2)
    assert_ranks_agree(logs, 2)

    logs = tmp_path / "training"
    train = ["--data", "runs/preprocessed", "--device", "cuda", "--expansion", "2", "--k", "4", "--batch-size", "256"]
    train += ["--wandb", "disabled", "--val-every", "5", "--checkpoint-every", "3", "--eval-sentences", "16"]
    run_stage(root, logs, "sae_training.py", [*train, "--dead-tokens", "1000", "--out", str(out / "sae")], ranks=2)
    seqs = assert_ranks_agree(logs, 2)
    assert sum(r["op"] == "all_reduce" for r in seqs[0]) >= 3 * 39 // 2  # three per step: the run's collectives ran
    # validation's sums (5 + n_latents, fp64) are all-reduced: the ranks share the validation rows
    assert {"op": "all_reduce", "shapes": [[5 + 128]], "dtypes": ["torch.float64"]} in seqs[0]

    for source in ("capture", "model"):
        logs = tmp_path / f"top_{source}"
        top = ["--sae", sae_dir, "--sentences", "runs/sentences", "--device", "cuda", "--top-n", "5"]
        top += ["--max-batch-tokens", "256", "--source", source, "--out", str(out / f"top_{source}")]
        run_stage(root, logs, "capture_top_activating_sentences.py", top, ranks=2)
        assert_ranks_agree(logs, 2)
    # the same SAE on the same stored activations, on the emulated device: the CPU run's tables
    cols = ["latent", "aggregation", "rank", "sentence_id"]
    on_cpu = pq.read_table(root / "runs" / "top_sentences" / "top_sentences.parquet", columns=cols)
    assert pq.read_table(out / "top_capture" / "top_sentences.parquet", columns=cols).equals(on_cpu)

    steer = ["--sae", sae_dir, "--top-sentences", "runs/top_sentences", "--meanings", "latent_index_meaning"]
    steer += ["--device", "cuda", "--n-candidates", "2", "--max-new-tokens", "4", "--out", str(out / "steer")]
    run_stage(root, tmp_path / "steer", "steering_evaluation.py", steer)
    assert json.loads((out / "steer" / "results.json").read_text())["summary"]

    infer = ["--device", "cuda", "--max-new-tokens", "3", "--no-stream", "--prompt", "The river", "A", "--sae", sae_dir]
    infer += ["--meanings", "latent_index_meaning", "--steer", "3:h_bias:4", "--compare", "--inspect", "2"]
    done = run_stage(root, tmp_path / "infer", "llama_3_inference.py", [*infer, "--temperature", "0.7"])
    assert "steered" in done.stdout

    session = f"""
import torch
from pipeline.steering.session import Session
from pipeline.steering.splice import SteeringEntry
from pipeline.steering.output_score import promoted_tokens
from pipeline.steering.vectors import sae_directions
s = Session.open(None, {sae_dir!r}, "latent_index_meaning", "cuda", "auto")
assert s.loaded.model.tok_embeddings.weight.device.type == "cuda"
entries = [SteeringEntry(3, "h_bias", 4.0)]
pairs = s.complete(s.text_prompts(["The river"]), entries, max_new_tokens=3, temperature=0.0)
for _ in s.stream(s.text_prompts(["A"]), entries, max_new_tokens=2, temperature=0.7):
    pass
ids = promoted_tokens(s.loaded.model, sae_directions(s.steerable.sae, [1, 2]), 3)
print(len(s.inspect(pairs[0][1], entries, "all", 3)), ids.device.type, tuple(ids.shape))
"""
    done = subprocess.run(
        [sys.executable, "-c", session],
        cwd=root,
        env=emulated_env(tmp_path / "gradio"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-4:] == ["3", "cuda", "(2,", "3)"], done.stdout


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_at_the_collective_timeout(tiny_pipeline, tmp_path):
    """Rank 1 hangs in its first step; rank 0 waits in the step's all-reduce only PIPELINE_DIST_TIMEOUT_S (not
    gloo's 30 min / NCCL's 10 min), then says so in one line and torchrun stops both."""
    root = tiny_pipeline[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PIPELINE_DIST_TIMEOUT_S": "5"}
    env["PIPELINE_FAULTS"] = "training.step@1=sleep:600"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "sae_training.py"), "--data", "runs/preprocessed", "--out", str(tmp_path / "sae"), "--k", "4"]
    cmd += [
        "--device",
        "cpu",
        "--expansion",
        "2",
        "--batch-size",
        "256",
        "--wandb",
        "disabled",
        "--eval-sentences",
        "0",
    ]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error: rank 0: a collective failed" in line]
    assert errors and "PIPELINE_DIST_TIMEOUT_S=5s" in errors[0], done.stderr[-3000:]


@pytest.mark.slow
def test_ranks_that_do_not_share_the_output_folder_stop_at_once(tmp_path):
    """Multi-node with a node-local --out: every rank stops at the start with one line (was: rank 0's finalize,
    after the whole capture). Two ranks on one machine, each given its own folder, stand in for two nodes."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from pipeline.core.cli import run_main\n"
        "from pipeline.core.distributed import check_shared_folder, run_distributed\n"
        "class Cfg:\n    device = 'cpu'\n"
        "def work(cfg, info):\n"
        "    folder = Path(sys.argv[1]) / (f'node{info.rank}' if sys.argv[2] == 'local' else 'shared')\n"
        "    folder.mkdir(parents=True, exist_ok=True)\n"
        "    check_shared_folder(info, folder)\n"
        "    print('agreed', info.rank)\n"
        "run_main(lambda cfg: run_distributed(work, cfg), Cfg())\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PIPELINE_DIST_TIMEOUT_S": "60"}
    shared = subprocess.run([*cmd, str(tmp_path), "shared"], env=env, capture_output=True, text=True, timeout=120)
    assert shared.returncode == 0 and shared.stdout.count("agreed") == 2, shared.stderr[-2000:]
    local = subprocess.run([*cmd, str(tmp_path), "local"], env=env, capture_output=True, text=True, timeout=120)
    assert local.returncode != 0 and "agreed" not in local.stdout
    assert "rank(s) [1] do not see the files rank 0 writes there" in local.stderr, local.stderr[-2000:]
    assert not list(tmp_path.rglob(".rank0-probe"))


def test_padded_gqa_attention_on_cuda_avoids_the_math_kernel(tmp_path):
    """A padding mask with grouped kv heads: on CUDA the kv heads are expanded, so SDPA is called without
    enable_gqa (memory-efficient attention takes the mask; with GQA only the math kernel would); same result."""
    code = """
import torch
import torch.nn.functional as F
from llama_3.model import SdpaAttention
torch.manual_seed(0)
q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
mask[0, :, :, 0] = False
mask[0, :, 0, 0] = True
calls = []
real = F.scaled_dot_product_attention
F.scaled_dot_product_attention = lambda *a, **kw: calls.append((kw["enable_gqa"], a[1].shape[1])) or real(*a, **kw)
on_cpu = SdpaAttention()(q, k, v, mask, False)
on_gpu = SdpaAttention()(q.cuda(), k.cuda(), v.cuda(), mask.cuda(), False)
assert calls == [(True, 2), (False, 4)], calls
torch.testing.assert_close(on_gpu.cpu(), on_cpu)
print("ok")
"""
    done = run_emulated(code, tmp_path)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr[-3000:]
