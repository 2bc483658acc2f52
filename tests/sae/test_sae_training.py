"""SAE training: ground-truth recovery, aux-k revival, DDP equality, SIGKILL + resume bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.manifest import make_manifest, read_jsonl, write_json_atomic
from pipeline.preprocessing.preprocessed import KIND as PRE_KIND
from pipeline.preprocessing.preprocessed import Moments
from pipeline.sae.config import TrainConfig
from pipeline.sae.model import TopKSae
from pipeline.sae.training import checkpoint_state
from sae_training import main as train_main
from tests.collective_log import assert_ranks_agree, collective_env

REPO = Path(__file__).resolve().parents[2]


def synthetic(n: int, d: int = 32, n_true: int = 48, k_true: int = 3, seed: int = 0):
    """Tokens that are sums of k_true of n_true known unit directions with positive magnitudes."""
    g = np.random.default_rng(seed)
    dirs = g.standard_normal((n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.stack([g.choice(n_true, k_true, replace=False) for _ in range(n)])
    mags = g.uniform(1.0, 3.0, (n, k_true))
    x = np.einsum("nk,nkd->nd", mags, dirs[idx]) + 0.01 * g.standard_normal((n, d))
    return x.astype(np.float32), dirs


def fake_preprocessed(directory: Path, train: np.ndarray, val: np.ndarray, batch_size: int = 256) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "train_acts.npy", train)
    np.save(directory / "val_acts.npy", val)
    m = Moments.of(train)
    write_json_atomic(
        directory / "stats.json",
        {"count": m.n, "mean": m.mean.tolist(), "var": m.var.tolist(), "mean_sq_norm": m.sq_norm_sum / m.n},
    )
    write_json_atomic(
        directory / "manifest.json",
        make_manifest(
            PRE_KIND,
            config={},
            inputs={"model": {"path": "synthetic"}},
            counts={"train_tokens": len(train), "val_tokens": len(val)},
            fingerprint=f"synthetic-{len(train)}",
            hook_point="resid_pre.1",
            d_model=train.shape[1],
            storage_dtype="torch.float32",
            batch_size=batch_size,
            tokenization={"add_bos": False, "max_tokens": 192, "exclude_first_positions": 0},
        ),
    )
    return directory


def cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        wandb="disabled",
        device="cpu",
        batch_size=256,
        val_every=10**9,
        checkpoint_every=10**9,
    )
    return TrainConfig(**{**base, **kw})


def test_recovers_known_sparse_directions(tmp_path):
    x, dirs = synthetic(12_000)
    data = fake_preprocessed(tmp_path / "data", x[:10_000], x[10_000:])
    m = train_main(cfg(data, tmp_path / "run", n_latents=96, k=3, epochs=8, lr=4e-3, warmup_steps=10))
    sae = TopKSae.load(tmp_path / "run" / "sae")
    W = sae.W_dec.detach().numpy()
    cos = dirs @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T  # [n_true, n_latents]
    best = cos.max(1)
    assert best.mean() > 0.9, best
    assert m["final_validation"]["val/fvu"] < 0.1
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0, rtol=1e-5)  # unit rows after training


def test_aux_k_trains_only_dead_latents_toward_the_residual():
    """The aux-k loss moves only the dead latents' rows, and lowers the residual they fail to explain."""
    from pipeline.sae.model import SaeConfig
    from pipeline.sae.training import aux_k_loss

    torch.manual_seed(0)
    x = torch.from_numpy(synthetic(2_000)[0])
    sae = TopKSae(SaeConfig(d_model=32, n_latents=64, k=3))
    with torch.no_grad():
        out = sae(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    opt = torch.optim.Adam([sae.W_enc, sae.W_dec, sae.b_enc], lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = aux_k_loss(sae, out.x_norm, out.x_hat_norm, dead, k_aux=8, denominator=len(x))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for name in ("W_enc", "W_dec", "b_enc"):
        changed = (getattr(sae, name).detach() != before[name]).reshape(64, -1).any(1)
        assert changed[dead].any() and not changed[~dead].any(), name
    assert torch.equal(sae.b_pre, before["b_pre"])  # the residual is decoded without b_pre


def test_aux_k_revives_latents_that_plain_training_leaves_dead(tmp_path):
    """Data in a 24-dim subspace of d=32 holds 128 features; half of 128 latents start in the
    8-dim complement (as a latent can start nearly orthogonal to an anisotropic residual stream).
    Those never reach the top k, so the main loss never trains them: plain training leaves them
    dead and 64 features unlearned. Aux-k trains them on the residual until they fire."""
    from pipeline.core.distributed import DistInfo
    from pipeline.sae.training import Trainer, batch_order

    d, r, n_true, n = 32, 24, 128, 22_000
    g = np.random.default_rng(0)
    dirs = g.standard_normal((n_true, r))
    dirs = np.concatenate([dirs / np.linalg.norm(dirs, axis=1, keepdims=True), np.zeros((n_true, d - r))], 1)
    idx = np.stack([g.choice(n_true, 3, replace=False) for _ in range(n)])
    x = (np.einsum("nk,nkd->nd", g.uniform(1, 3, (n, 3)), dirs[idx]) + 0.01 * g.standard_normal((n, d))).astype(
        np.float32
    )
    data = fake_preprocessed(tmp_path / "data", x[:20_000], x[20_000:])
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    final = {}
    for aux_coef in (0.0, 1 / 32):
        t = Trainer(
            cfg(
                data,
                tmp_path / "run",
                n_latents=128,
                k=4,
                epochs=4,
                lr=4e-3,
                warmup_steps=10,
                dead_tokens=2_000,
                aux_coef=aux_coef,
            ),
            info,
        )
        with torch.no_grad():
            t.sae.W_dec[64:, :r] = 0
            t.sae.normalize_decoder()
            t.sae.W_enc.copy_(t.sae.W_dec)
        assert t.validate()["val/dead_pct"] == 50.0
        for epoch in range(4):
            for start in batch_order(len(t.train), 256, 0, epoch):
                t.train_step(int(start))
                t.step += 1
        final[aux_coef] = t.validate()
    plain, aux = final[0.0], final[1 / 32]
    assert plain["val/dead_pct"] >= 45.0, plain
    assert aux["val/dead_pct"] <= 15.0, aux
    assert aux["val/fvu"] < plain["val/fvu"] - 0.03, (plain, aux)


def test_aux_k_loss_equals_a_dense_masked_reference():
    """The dead ids from a fixed-size topk (no nonzero()) give the loss of the textbook form: the full
    [N, L] pre-activations with every live latent masked out, top k_aux, decoded densely."""
    from pipeline.sae.model import SaeConfig
    from pipeline.sae.training import aux_k_loss

    torch.manual_seed(1)
    x = torch.from_numpy(synthetic(500)[0])
    sae = TopKSae(SaeConfig(d_model=32, n_latents=64, k=3))
    with torch.no_grad():
        sae.b_enc.normal_()
        out = sae(x)
    for n_dead, k_aux in ((0, 8), (5, 8), (20, 8), (64, 16)):
        dead = torch.zeros(64, dtype=torch.bool)
        dead[torch.randperm(64)[:n_dead]] = True
        pre = (out.x_norm - sae.b_pre) @ sae.W_enc.t() + sae.b_enc  # [N, L]
        top = pre.masked_fill(~dead, -torch.inf).topk(min(k_aux, max(n_dead, 1)), dim=-1)
        h = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()) * dead  # [N, L]
        reference = (h @ sae.W_dec - (out.x_norm - out.x_hat_norm)).pow(2).sum() / 7.0 if n_dead else 0.0
        for hint in (None, n_dead):
            got = aux_k_loss(sae, out.x_norm, out.x_hat_norm, dead, k_aux, 7.0, n_dead=hint)
            torch.testing.assert_close(got.detach(), torch.as_tensor(reference).float(), rtol=1e-5, atol=1e-6)


class HostSyncs:
    """Counts the calls this repository's code makes that wait for the device on a GPU (a value copied to
    the host, or an output whose size depends on the data). CPU tensors cannot show a sync, so the test
    counts the calls that would make one."""

    METHODS = ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    FUNCTIONS = ("nonzero", "bincount", "unique", "masked_select", "where")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self.wrap(getattr(torch.Tensor, name), name))
        for name in self.FUNCTIONS:
            fn = getattr(torch, name)
            counted = self.wrap(fn, "torch." + name)
            # torch.where(cond, a, b) has a fixed output shape; only its one-argument form syncs
            monkeypatch.setattr(
                torch,
                name,
                counted if name != "where" else lambda *a, **k: (counted if len(a) + len(k) == 1 else fn)(*a, **k),
            )

    def wrap(self, fn, name):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(str(REPO)) and "/tests/" not in caller:
                self.calls.append(f"{name} from {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return fn(*args, **kwargs)

        return counted


def test_a_training_step_syncs_with_the_host_once_while_latents_are_dead(tmp_path, monkeypatch):
    """One host sync per step, also while aux-k runs: the dead ids used to come from nonzero(), and the
    backward's CSR from bincount, each a second data-dependent sync on a GPU."""
    from pipeline.core.distributed import DistInfo
    from pipeline.sae.training import Trainer

    x, _ = synthetic(6_000)
    data = fake_preprocessed(tmp_path / "data", x[:5_000], x[5_000:])
    t = Trainer(
        cfg(data, tmp_path / "run", n_latents=128, k=3, dead_tokens=256), DistInfo(0, 1, 0, 1, torch.device("cpu"))
    )
    with torch.no_grad():
        t.sae.b_enc[64:] = -50.0  # half the latents can never fire: dead after one batch
    syncs = HostSyncs(monkeypatch)
    dead = []
    for step, start in enumerate(range(0, 256 * 6, 256)):
        rows = t.local_rows(start)  # the prefetcher's work, off the step's path
        syncs.calls.clear()
        metrics = t.train_step(start, rows)
        t.step += 1
        assert len(syncs.calls) == 1, (step, syncs.calls)
        dead.append(metrics["debug/dead_latents_ratio"])
        monkeypatch.undo()
        assert t.n_dead == int((t.tokens_since_fired >= 256).sum()), step  # the host count is the device's
        syncs = HostSyncs(monkeypatch)
    assert dead[0] == 0 and min(dead[1:]) >= 0.5, dead


def checkpoint_step(path: Path) -> int:
    try:
        return checkpoint_state(path)["step"]
    except Exception:  # being renamed into place this very moment
        return -1


def logged(run: Path, key: str) -> list[float]:
    return [r[key] for r in read_jsonl(run / "metrics.jsonl") if key in r]


def test_aux_k_loss_stays_bounded_on_a_one_row_tail_batch(tmp_path):
    """20,481 rows in batches of 256 leave a last batch of one row: its residual has no variance, which
    the aux loss used to divide by (logged 1.4e13, and Adam's second moments never recovered)."""
    x, _ = synthetic(21_000, d=32, n_true=96)
    aux = {}
    for n in (20_480, 20_481):
        data = fake_preprocessed(tmp_path / f"data{n}", x[:n], x[20_500:])
        # seed 4 puts the one-row batch at step 70 of 81, when a quarter of the latents are dead
        train_main(cfg(data, tmp_path / f"run{n}", n_latents=128, k=4, dead_tokens=1_000, eval_sentences=0, seed=4))
        aux[n] = logged(tmp_path / f"run{n}", "train/aux_loss")
        assert all(np.isfinite(aux[n])) and max(logged(tmp_path / f"run{n}", "debug/dead_latents_ratio")) > 0
    assert max(aux[20_481]) <= 2 * max(aux[20_480]), (max(aux[20_481]), max(aux[20_480]))


def run_cli(args: list[str], torchrun: int = 0, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        if torchrun
        else [sys.executable]
    )
    return subprocess.Popen(
        cmd + ["sae_training.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae" / "sae.safetensors"))


@pytest.mark.slow
def test_two_rank_gloo_ddp_equals_one_process(tmp_path):
    """With dead latents and aux-k active, and a one-row tail batch (rank 0 gets its row, rank 1 none)."""
    x, _ = synthetic(4_096)
    data = fake_preprocessed(tmp_path / "data", x[:3_585], x[3_585:])
    args = [
        "--data",
        str(data),
        "--wandb",
        "disabled",
        "--device",
        "cpu",
        "--n-latents",
        "128",
        "--k",
        "3",
        "--batch-size",
        "256",
        "--epochs",
        "1",
        "--dead-tokens",
        "256",
        "--val-every",
        "1000000",
    ]
    one, two = (
        run_cli(args + ["--out", str(tmp_path / "one")]),
        run_cli(args + ["--out", str(tmp_path / "two")], torchrun=2, env_extra=collective_env(tmp_path / "logs")),
    )
    for p in (one, two):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    assert_ranks_agree(tmp_path / "logs", 2)  # held to NCCL's rules; both ranks ran the same collectives
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2
    for run in ("one", "two"):
        aux = logged(tmp_path / run, "train/aux_loss")
        assert max(logged(tmp_path / run, "debug/dead_latents_ratio")) > 0.02 and max(aux) > 0, run
        assert all(np.isfinite(aux)) and max(aux) < 10, (run, max(aux))
    np.testing.assert_allclose(
        logged(tmp_path / "two", "train/aux_loss"), logged(tmp_path / "one", "train/aux_loss"), rtol=1e-4, atol=1e-6
    )
    # Same global batches and mean gradient; only the gradient summation order differs (~1e-7), which Adam's
    # tiny eps and TopK near-ties grow to ~1e-4 on a few latents over 14 steps. The old per-rank aux-k
    # normaliser made these runs differ by 1e12 in the logged aux loss.
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=2e-4, msg=k)
    assert not torch.equal(w1["W_dec"], TopKSae.load(tmp_path / "one" / "sae").W_dec.new_zeros(1))
    # validation: each rank takes every other 4,096-row chunk (rank 1 none of these 511 rows), one all-reduce
    v1, v2 = (json.loads((tmp_path / r / "manifest.json").read_text())["final_validation"] for r in ("one", "two"))
    assert v1.keys() == v2.keys() and v1["val/tokens"] == v2["val/tokens"] == 511
    for k in v1:
        assert v2[k] == pytest.approx(v1[k], rel=1e-3, abs=1e-4), k


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    x, _ = synthetic(6_000)
    data = fake_preprocessed(tmp_path / "data", x[:5_120], x[5_120:])
    args = [
        "--data",
        str(data),
        "--wandb",
        "disabled",
        "--device",
        "cpu",
        "--n-latents",
        "64",
        "--k",
        "3",
        "--batch-size",
        "256",
        "--epochs",
        "3",
        "--dead-tokens",
        "512",
        "--checkpoint-every",
        "7",
        "--val-every",
        "5",
    ]
    clean = run_cli(args + ["--out", str(tmp_path / "clean")])
    assert clean.wait(timeout=300) == 0
    out = tmp_path / "killed"
    victim = run_cli(args + ["--out", str(out)], env_extra={"PIPELINE_FAULTS": "training.step=sleep:0.05"})
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        st = out / "checkpoint" / "state.safetensors"
        if st.is_file() and checkpoint_step(st) >= 21:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "training finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    step_at_kill = checkpoint_step(out / "checkpoint" / "state.safetensors")
    assert 0 < step_at_kill < 60
    resumed = run_cli(args + ["--out", str(out)])
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["resumed"] and m["counts"]["steps"] == 60
    w_clean, w_res = weights(tmp_path / "clean"), weights(out)
    for k in w_clean:
        assert torch.equal(w_clean[k], w_res[k]), k


def test_run_folder_refuses_another_config_and_bad_batches(tmp_path):
    from llama_3 import PipelineInputError

    x, _ = synthetic(1_500)
    data = fake_preprocessed(tmp_path / "data", x[:1_280], x[1_280:])
    train_main(cfg(data, tmp_path / "run", n_latents=64, k=3))
    with pytest.raises(PipelineInputError, match="holds a training run made with other settings"):
        train_main(cfg(data, tmp_path / "run", n_latents=64, k=4))
    with pytest.raises(PipelineInputError, match=r"--k 65: must be in 1\.\.64"):
        train_main(cfg(data, tmp_path / "run2", n_latents=64, k=65))
    bad = x[:1_280].copy()
    bad[300, 5] = np.nan
    data_nan = fake_preprocessed(tmp_path / "data_nan", bad, x[1_280:])
    m = train_main(cfg(data_nan, tmp_path / "run3", n_latents=64, k=3))
    assert m["counts"]["skipped_nonfinite_batches"] == 1  # skipped and counted, never silent
    with pytest.raises(PipelineInputError, match="NaN/inf in the training batch"):
        train_main(cfg(data_nan, tmp_path / "run4", n_latents=64, k=3, nonfinite="stop"))


def test_a_checkpoint_is_one_atomic_commit(tmp_path, monkeypatch):
    """A kill after the first rename of a checkpoint save must not pair one step's weights with another's
    position (it used to: state.safetensors, then state.json, each renamed on its own)."""
    import os as os_module

    from pipeline.core.distributed import DistInfo
    from pipeline.sae.training import Trainer

    x, _ = synthetic(3_000)
    data = fake_preprocessed(tmp_path / "data", x[:2_560], x[2_560:])
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    t = Trainer(cfg(data, tmp_path / "run", n_latents=32, k=3), info)
    saved = {}
    for step in range(1, 9):
        t.train_step((step - 1) * 256)
        t.step, t.batch_in_epoch = step, step
        if step in (4, 8):
            if step == 8:  # the kill: the first file renamed into place, nothing after it
                real = os_module.replace
                calls = []

                def replace_then_die(a, b):
                    if calls:
                        raise KeyboardInterrupt("killed")
                    calls.append(b)
                    return real(a, b)

                monkeypatch.setattr(os_module, "replace", replace_then_die)
            try:
                t.save_checkpoint(tmp_path / "run")
            except KeyboardInterrupt:
                pass
            monkeypatch.undo()
            saved[step] = t.sae.W_enc.detach().clone()
    back = Trainer(cfg(data, tmp_path / "run", n_latents=32, k=3), info)
    assert back.load_checkpoint(tmp_path / "run")
    assert back.step in saved and torch.equal(back.sae.W_enc, saved[back.step]), back.step


@pytest.mark.slow
def test_ranks_that_find_different_checkpoints_stop_with_one_line(tmp_path):
    x, _ = synthetic(2_000)
    data = fake_preprocessed(tmp_path / "data", x[:1_536], x[1_536:])
    args = ["--data", str(data), "--wandb", "disabled", "--device", "cpu", "--n-latents", "32", "--k", "3"]
    args += ["--batch-size", "256", "--out", str(tmp_path / "run")]
    first = run_cli(args, torchrun=2)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    (tmp_path / "run" / "manifest.json").unlink()  # unfinished: the next run resumes from the checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        cmd + [str(REPO / "tests" / "ddp_rank_without_checkpoint.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here
    )
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert errors and all("rank 0 at step 6, rank 1 at step 0" in e for e in errors), proc.stderr[-3000:]


def test_a_cuda_checkpoint_is_written_while_training_goes_on(tmp_path):
    """On CUDA the checkpoint's host copies are taken at the save and a thread writes them: the file holds the
    state at the save, not what training changed meanwhile, and the next save waits for it (emulated device)."""
    data = fake_preprocessed(tmp_path / "data", synthetic(2048)[0], synthetic(256, seed=1)[0])
    code = f"""
import threading, torch
from safetensors.torch import load_file
from pathlib import Path
from pipeline.core.distributed import DistInfo
from pipeline.sae.config import TrainConfig
from pipeline.sae.training import Trainer
cfg = TrainConfig(data={str(data)!r}, out={str(tmp_path / "run")!r}, device="cuda", wandb="disabled", batch_size=256)
t = Trainer(cfg, DistInfo(0, 1, 0, 1, torch.device("cuda", 0)))
for start in (0, 256):
    t.train_step(start)
    t.step += 1
at_save = t.sae.W_dec.detach().cpu().clone()
t.save_checkpoint(Path(cfg.out))
assert isinstance(t._checkpoint_writer, threading.Thread)  # asynchronous on CUDA
t.train_step(512)  # training goes on while the thread writes
t.wait_for_checkpoint()
saved = load_file(str(Path(cfg.out) / "checkpoint" / "state.safetensors"))
assert torch.equal(saved["sae.W_dec"], at_save) and not torch.equal(saved["sae.W_dec"], t.sae.W_dec.cpu())
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "device_check"), str(REPO)])}
    env["PIPELINE_DEVICE_CHECK"] = "cuda"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr[-3000:]


def test_deterministic_flag_switches_torch_to_deterministic_kernels(tmp_path):
    """--deterministic: torch's deterministic mode and a fixed cuBLAS workspace, set before the run starts; on
    the CPU (already deterministic) the SAE is bit-identical to a run without it, so no op lacks a kernel."""
    probe = (
        "import os, torch\n"
        "from pipeline.core.distributed import run_distributed\n"
        "class Cfg:\n    device, deterministic = 'cpu', True\n"
        "print(run_distributed(lambda cfg, info: (torch.are_deterministic_algorithms_enabled(),"
        " os.environ.get('CUBLAS_WORKSPACE_CONFIG')), Cfg()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["(True,", "':4096:8')"], done.stderr[-2000:]
    x, _ = synthetic(2048)
    data = fake_preprocessed(tmp_path / "data", x[:1792], x[1792:])
    args = ["--data", str(data), "--wandb", "disabled", "--device", "cpu", "--n-latents", "96", "--k", "3"]
    args += ["--batch-size", "256", "--dead-tokens", "256", "--eval-sentences", "0"]
    runs = [
        run_cli([*args, "--out", str(tmp_path / "plain")]),
        run_cli([*args, "--deterministic", "--out", str(tmp_path / "det")]),
    ]
    for p in runs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    plain, det = weights(tmp_path / "plain"), weights(tmp_path / "det")
    assert all(torch.equal(plain[k], det[k]) for k in plain)
