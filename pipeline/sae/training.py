"""The SAE's training step, DDP-ready: learning-rate schedule, batch order, aux-k, the Trainer (optimizer, dead-
latent counters, validation, checkpoints).
"""

from __future__ import annotations

import json
import math
import threading
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama_3.cpu_features import cuda_native_bf16, has_native_bf16, warn_if_emulated
from llama_3.errors import PipelineInputError
from pipeline.capture.activations import CaptureOutput
from pipeline.core.distributed import DistInfo
from pipeline.core.manifest import atomic_path
from pipeline.preprocessing.preprocessed import PreprocessedOutput
from pipeline.sae.config import TrainConfig
from pipeline.sae.model import SaeConfig, TopKSae, TrainingData
from pipeline.sae.training_run import CHECKPOINT_DIR


def lr_at(step: int, total: int, cfg: TrainConfig, peak: float) -> float:
    """Linear warmup, then cosine to min_lr_ratio * peak, evaluated per optimizer step."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_order(n_rows: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Start rows of this epoch's global batches, in a seeded order (the last batch may be short)."""
    starts = np.arange(0, n_rows, batch_size)
    return np.random.default_rng([seed, epoch]).permutation(starts)


def aux_k_loss(
    sae: TopKSae,
    x_norm: torch.Tensor,
    x_hat_norm: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    denominator: float,
    n_dead: int | None = None,
    target_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruct the residual target - x̂ (in normalised space; an SAE's target is x̃ itself, a transcoder's
    `target_norm`) from the top dead latents of input x̃, decoded without b_pre: the summed squared error over
    these rows / `denominator`.

    The trainer passes (global batch rows x the data's variance), the main loss's normaliser, as sparsify
    divides both by the data's variance: a number fixed for the run and equal on every rank. Dividing by
    the variance of these rows' own residual (as before) blew up when a rank's share of a tail batch was
    one row (variance 0, aux loss 1e13) and made ranks disagree; zero rows now contribute exactly 0.

    `n_dead` = dead.sum() when the caller already holds it on the host (the trainer does, from the previous
    step's sync): the dead ids then come from a fixed-size topk instead of nonzero(), whose data-dependent
    output shape is a second host sync per step on a GPU."""
    if n_dead is None:
        n_dead = int(dead.sum())
    if n_dead == 0 or len(x_norm) == 0:
        return x_norm.new_zeros(())
    dead_ids = dead.float().topk(n_dead, sorted=False).indices.sort().values  # [n_dead]: nonzero()'s ids
    residual = ((x_norm if target_norm is None else target_norm) - x_hat_norm).detach()
    pre = sae.encoder_input(x_norm).detach() @ sae.W_enc[dead_ids].t() + sae.b_enc[dead_ids]  # [N, n_dead]
    top, local = pre.topk(min(k_aux, n_dead), dim=-1, sorted=False)
    recon = sae.decode_residual(top.relu(), dead_ids[local])
    return (recon - residual).pow(2).sum() / denominator


def training_data(data_dir: str, data: PreprocessedOutput) -> TrainingData:
    """The chain of outputs the SAE is trained from, as far as it can be followed (a synthetic capture in a
    bench may name no sentences)."""
    found = TrainingData(preprocessed=str(data_dir), preprocessed_fingerprint=data.fingerprint)
    if data.capture_dir is None:
        return found
    try:
        cap = CaptureOutput.open(data.capture_dir)
    except PipelineInputError:  # moved or deleted since preprocessing: its path is all that is known
        return replace(found, capture=str(data.capture_dir))
    return replace(
        found,
        capture=str(data.capture_dir),
        capture_fingerprint=cap.fingerprint,
        capture_sentences=cap.max_sentences,
        sentences=str(cap.sentences_dir),
        sentences_fingerprint=cap.sentences_fingerprint,
    )


def paired_target(data: PreprocessedOutput, target_dir: str) -> PreprocessedOutput:
    """A transcoder's target data, checked to pair row by row with its input data: the same capture, and the
    same (sentence, position) at every training and validation row (same split, exclusions and shuffle)."""
    target = PreprocessedOutput.open(target_dir)
    if (target.manifest["inputs"].get("capture_fingerprint"), target.d_model) != (
        data.manifest["inputs"].get("capture_fingerprint"),
        data.d_model,
    ) or target.hook_point == data.hook_point:
        raise PipelineInputError(
            f"--target-data {target_dir}: not another hook point preprocessed from the same capture as --data "
            f"{data.directory}"
        )
    for split in ("train", "val"):
        a, b = data.index(split), target.index(split)
        same = a.shape == b.shape and all(
            np.array_equal(a[i : i + (1 << 20)], b[i : i + (1 << 20)]) for i in range(0, len(a), 1 << 20)
        )
        if not same:
            raise PipelineInputError(
                f"--target-data {target_dir}: its {split} rows are not --data's (preprocess both with the same "
                "--seed, --val-fraction and --exclude-first-positions)"
            )
    return target


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.data = PreprocessedOutput.open(cfg.data)
        self.train = self.data.reader("train")  # plain reads: RSS does not grow with the data
        self.val = self.data.reader("val")
        # A transcoder's target rows pair with the input's; its loss, scale and FVU are the target's.
        self.target = paired_target(self.data, cfg.target_data) if cfg.target_data else None
        self.target_train = self.target.reader("train") if self.target else None
        self.target_val = self.target.reader("val") if self.target else None
        self.stats = (self.target or self.data).stats
        if cfg.skip and not self.target:
            raise PipelineInputError("--skip: a skip connection needs a transcoder (--target-data)")
        d = self.data.d_model
        n_latents = cfg.n_latents or cfg.expansion * d
        if not 0 < cfg.k <= n_latents:
            raise PipelineInputError(f"--k {cfg.k}: must be in 1..{n_latents} (the number of latents)")
        if cfg.k_start > n_latents:
            raise PipelineInputError(f"--k-start {cfg.k_start}: must be at most {n_latents} (the number of latents)")
        if cfg.k_start < -1 or cfg.k_anneal_steps < -1 or (cfg.k_anneal_steps > 0 and 0 <= cfg.k_start <= cfg.k):
            raise PipelineInputError(
                f"--k-start {cfg.k_start} / --k-anneal-steps {cfg.k_anneal_steps}: K-annealing starts above --k "
                f"{cfg.k} (-1: the defaults, 0: off)"
            )
        if not 0 < cfg.batch_size <= len(self.train):
            raise PipelineInputError(
                f"--batch-size {cfg.batch_size}: must be in 1..{len(self.train)} (the training tokens in {cfg.data})"
            )
        if cfg.batch_size % info.world_size:
            raise PipelineInputError(f"--batch-size {cfg.batch_size} is not divisible by the {info.world_size} ranks")
        if cfg.epochs < 1:
            raise PipelineInputError(f"--epochs {cfg.epochs}: need at least 1")
        self.autocast = cfg.autocast == "on" or (
            cfg.autocast == "auto"
            and (info.device.type == "cuda" and cuda_native_bf16() or info.device.type == "cpu" and has_native_bf16())
        )
        if self.autocast:
            warn_if_emulated(torch.bfloat16, info.device, "--autocast on")
        input_scale = math.sqrt(d / self.data.stats["mean_sq_norm"])  # E||x̃||² = d_model
        output_scale = math.sqrt(d / self.stats["mean_sq_norm"]) if self.target else 1.0
        self.sae_cfg = SaeConfig(
            d_model=d,
            n_latents=n_latents,
            k=cfg.k,
            normalize=cfg.normalize,
            input_scale=input_scale,
            hook_point=self.data.hook_point,
            output_hook_point=self.target.hook_point if self.target else "",
            output_scale=output_scale,
            skip=cfg.skip,
            topk_by_decoder_norm=cfg.topk_by_decoder_norm,
            model=self.data.model,
            exclude_first_positions=self.data.tokenization.exclude_first_positions,
            add_bos=self.data.tokenization.add_bos,
            max_tokens=self.data.tokenization.max_tokens,
            sink_norm=0.0 if self.target else self.data.tokenization.sink_norm,
            trained_on=training_data(cfg.data, self.data),
        )
        torch.manual_seed(cfg.seed)
        self.sae = TopKSae(self.sae_cfg).to(info.device)
        with torch.no_grad():  # b_pre starts at the (normalised) mean of what the SAE reconstructs
            mean = torch.tensor(self.stats["mean"], dtype=torch.float32)
            scale = output_scale if self.target else input_scale
            self.sae.b_pre.copy_(
                mean * scale if cfg.normalize == "dataset" else (mean if cfg.normalize == "none" else 0)
            )
        # OpenAI's 2e-4 base was tuned for ~10^9-token runs; at 10^5-10^7 tokens it leaves FVU twice as high
        # (0.20 vs 0.11 after 1M SmolLM2 tokens, bench/bench_sae.py). sparsify's default SignSGD steps
        # 5e-3 / sqrt(n / 2^14) per weight, the size of an Adam step at that lr; 2e-3 sits between.
        self.peak_lr = cfg.lr or 2e-3 / math.sqrt(n_latents / 2**14)
        self.opt = torch.optim.AdamW(
            self.sae.parameters(),
            lr=self.peak_lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            # CPU: one vectorised pass over each [L, d] weight instead of ~8 (44 ms of a 370 ms step on 2 AVX2
            # cores, bench/bench_sae.py); the GPU keeps the default multi-tensor path
            fused=True if info.device.type == "cpu" else None,
        )
        self.k_aux = cfg.k_aux or d // 2
        # The loss is MSE over the data's variance in the SAE's input space (≈ FVU), as OpenAI's and
        # sparsify's trainers normalise it: aux_coef = 1/32 means the same there and here. A fixed
        # number from the first rows (not each batch's variance), so every rank divides by the same.
        self.loss_scale = self._input_variance()
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long, device=info.device)
        self.n_dead = self._count_dead()  # on the host; each step's sync brings the next step's count
        self.step, self.epoch, self.batch_in_epoch, self.skipped = 0, 0, 0, 0
        self._checkpoint_writer: threading.Thread | None = None  # an asynchronous save in flight (CUDA)
        self._checkpoint_error: BaseException | None = None
        self.steps_per_epoch = -(-len(self.train) // cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        # K-annealing, -1 resolved: from 4k, over the first quarter of the steps
        self.k_start = min(4 * cfg.k, n_latents) if cfg.k_start == -1 else cfg.k_start
        self.k_anneal_steps = self.total_steps // 4 if cfg.k_anneal_steps == -1 else cfg.k_anneal_steps
        if self.k_start <= cfg.k:  # off (0, or nothing above k to start from)
            self.k_anneal_steps = 0

    def _count_dead(self) -> int:
        return int((self.tokens_since_fired >= self.cfg.dead_tokens).sum())

    @torch.no_grad()
    def _input_variance(self, n_rows: int = 65536) -> float:
        """E||x̃ - E x̃||² over the first rows, in float64 chunks (a full fp64 copy would cost GBs)."""
        total, sq, n = 0.0, 0.0, 0
        rows = self.train if self.target_train is None else self.target_train  # what the SAE reconstructs
        for a in range(0, min(n_rows, len(rows)), 8192):
            x = rows[a : min(a + 8192, n_rows, len(rows))].to(torch.float32)
            x = x[torch.isfinite(x).all(1)]  # bad rows are the step's business (--nonfinite), not the scale's
            x_norm = self.sae.normalize_target(x).double()
            total, sq, n = total + x_norm.sum(0), sq + x_norm.pow(2).sum().item(), n + len(x_norm)
        if n == 0:
            return 1.0
        return max(sq / n - (total / n).pow(2).sum().item(), 1e-12)

    # ---- one step ---------------------------------------------------------------------------
    def local_range(self, start: int) -> tuple[int, int, int]:
        """This rank's rows [a, b) of the global batch at `start`, and the global batch's size."""
        end = min(start + self.cfg.batch_size, len(self.train))
        per = -(-(end - start) // self.info.world_size)
        a = start + self.info.rank * per
        return a, min(a + per, end), end - start

    def local_rows(self, start: int) -> torch.Tensor:
        """This rank's share of the batch at `start`, read from disk in the storage dtype (host memory); a
        transcoder's [n, 2 d]: its input rows beside their targets."""
        a, b, _ = self.local_range(start)
        if self.target_train is None:
            return self.train[a:b]
        return torch.cat([self.train[a:b], self.target_train[a:b]], dim=1)

    def k_at(self, step: int) -> int:
        """K-annealing: k falls linearly from k_start to k over the first k_anneal_steps steps."""
        if not self.k_anneal_steps or step >= self.k_anneal_steps:
            return self.cfg.k
        return round(self.k_start + (self.cfg.k - self.k_start) * step / self.k_anneal_steps)

    def split_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[n, d] or a transcoder's [n, 2 d] -> (input, target or None)."""
        d = self.data.d_model
        return (x, None) if self.target is None else (x[:, :d], x[:, d:])

    def train_step(self, start: int, rows: torch.Tensor | None = None) -> dict:
        """One optimizer step on the global batch at `start`; `rows` is this rank's share already on the
        device (the prefetcher's), read here when None. One host sync: the logged numbers and the
        non-finite flag come back together, after the step's collectives."""
        if rows is None:
            rows = self.local_rows(start).to(self.info.device)
        both = rows.float()  # widened on the device: bf16 crosses to the GPU at half the bytes
        x, y = self.split_rows(both)
        global_n = self.local_range(start)[2]
        sae = self.sae
        dead = self.tokens_since_fired >= self.cfg.dead_tokens
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = sae(x, k=self.k_at(self.step))
            target_norm = out.x_norm if y is None else sae.normalize_target(y)
            # Each rank's share of the global mean: summed over ranks it is the one-process loss.
            sq = (out.x_hat_norm.float() - target_norm).pow(2).sum(-1)
            loss = sq.sum() / (global_n * self.loss_scale)
            # this rank's share of the global batch's aux loss, normalised like the main loss
            aux = aux_k_loss(
                sae,
                out.x_norm,
                out.x_hat_norm.float(),
                dead,
                self.k_aux,
                global_n * self.loss_scale,
                self.n_dead,
                target_norm=target_norm,
            )
        self.opt.zero_grad(set_to_none=True)
        (loss + self.cfg.aux_coef * aux).backward()
        n_latents = sae.cfg.n_latents
        fired = torch.zeros(n_latents, device=x.device).index_put_(
            (out.indices.reshape(-1),), (out.values > 0).reshape(-1).float(), accumulate=True
        )
        # the small tensors travel in one all-reduce: [loss, aux, non-finite, fired, b_enc, b_pre]
        small = torch.cat(
            [
                torch.stack([loss.detach(), aux.detach()]).float(),
                (~torch.isfinite(both).all()).float().reshape(1),
                fired,
                sae.b_enc.grad,
                sae.b_pre.grad,
            ]
        )
        if self.info.distributed:
            dist.all_reduce(sae.W_enc.grad)
            dist.all_reduce(sae.W_dec.grad)
            if sae.cfg.skip:
                dist.all_reduce(sae.W_skip.grad)
            dist.all_reduce(small)
        fired = small[3 : 3 + n_latents]  # summed over ranks: the same on every rank
        # Next step's dead counters, and their count, ride along with the logged numbers: one host sync.
        tokens_since_fired = (self.tokens_since_fired + global_n).masked_fill_(fired > 0, 0)
        next_dead = (tokens_since_fired >= self.cfg.dead_tokens).sum().reshape(1).float()
        loss_v, aux_v, bad, n_dead_next = torch.cat([small[:3], next_dead]).tolist()  # the step's host sync
        dead_ratio = self.n_dead / n_latents
        if bad:
            if self.cfg.nonfinite == "stop":
                raise PipelineInputError(
                    f"{self.cfg.data}: NaN/inf in the training batch at row {start}; --nonfinite skip skips such "
                    "batches"
                )
            self.skipped += 1
            return {"skipped": 1}
        sae.b_enc.grad.copy_(small[3 + n_latents : 3 + 2 * n_latents])
        sae.b_pre.grad.copy_(small[3 + 2 * n_latents :])
        sae.project_decoder_grad()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.total_steps, self.cfg, self.peak_lr)
        self.opt.step()
        sae.normalize_decoder()
        self.tokens_since_fired, self.n_dead = tokens_since_fired, int(n_dead_next)
        return {
            "train/loss": loss_v,
            "train/aux_loss": aux_v,
            "train/lr": self.opt.param_groups[0]["lr"],
            "debug/dead_latents_ratio": dead_ratio,
        }

    # ---- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, max_rows: int = 32768) -> dict:
        """Reconstruction on the first max_rows validation rows, in chunks of 4,096. Each rank takes every
        world_size-th chunk and one all-reduce adds the sums up: the ranks share the work (it was ~10 TFLOP on
        every rank at the users' size) and agree on the numbers. Sums stay on the device: no sync per chunk."""
        sae, device = self.sae, self.info.device
        mean = torch.tensor(self.stats["mean"], dtype=torch.float64, device=device)
        # [rows, squared error, squared error in the SAE's space, total variance, active latents], then counts
        sums = torch.zeros(5 + sae.cfg.n_latents, dtype=torch.float64, device=device)
        end = min(len(self.val), max_rows)
        for a in range(0, end, 4096)[self.info.rank :: self.info.world_size]:
            x = self.val[a : min(a + 4096, end)].to(device, torch.float32)
            # what the SAE reconstructs: its input, or a transcoder's target
            y = x if self.target_val is None else self.target_val[a : min(a + 4096, end)].to(device, torch.float32)
            out = sae(x)
            active = out.values > 0
            sums[0] += len(x)  # a scalar argument: no host-to-device copy
            sums[1:5] += torch.stack(
                [
                    (out.x_hat - y).double().pow(2).sum(),
                    (out.x_hat_norm - sae.normalize_target(y)).double().pow(2).sum(),
                    (y.double() - mean).pow(2).sum(),
                    active.sum().double(),
                ]
            )
            sums[5:].index_add_(0, out.indices[active], active[active].double())
        if self.info.distributed:
            dist.all_reduce(sums)
        n, sq_err, sq_norm_err, total_var, l0 = sums[:5].tolist()
        if n == 0:
            return {}
        freq = sums[5:] / n
        return {
            "val/loss": sq_norm_err / (n * self.loss_scale),
            "val/fvu": sq_err / max(total_var, 1e-30),
            "val/l0": l0 / n,
            "val/dead_pct": 100 * (freq == 0).double().mean().item(),
            "val/dense_pct": 100 * (freq > 0.1).double().mean().item(),
            "val/tokens": int(n),
        }

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, wait: bool = False) -> None:
        """One file, renamed into place: weights, optimizer, counters and RNG as tensors, the position in
        the data as JSON metadata, so a kill can never pair new weights with an old step.

        On CUDA the host copies are taken here and a thread writes them while training goes on: rank 0's
        multi-GB write (3.6 GB at 49k x 3,072) no longer holds every other rank at the next all-reduce. The
        next save, and the run's last (wait=True), wait for it first."""
        if not self.info.is_main:
            return
        tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in self.sae.state_dict().items()}
        for i, p in enumerate(self.sae.parameters()):
            for name, v in self.opt.state.get(p, {}).items():
                tensors[f"opt.{i}.{name}"] = (
                    v.detach().cpu().contiguous().reshape(v.shape) if v.dim() else v.detach().cpu().reshape(1)
                )
        tensors["tokens_since_fired"] = self.tokens_since_fired.cpu()
        tensors["torch_rng"] = torch.get_rng_state()
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped": self.skipped,
            "sae_cfg": asdict(self.sae_cfg),
        }
        self.wait_for_checkpoint()
        if wait or self.info.device.type != "cuda":  # on the CPU .cpu() copies nothing: write before it changes
            write_checkpoint(directory, tensors, state)
            return

        def write() -> None:
            try:
                write_checkpoint(directory, tensors, state)
            except BaseException as e:  # re-raised by the next wait
                self._checkpoint_error = e

        self._checkpoint_writer = threading.Thread(target=write, name="checkpoint-writer")
        self._checkpoint_writer.start()

    def wait_for_checkpoint(self) -> None:
        writer, self._checkpoint_writer = self._checkpoint_writer, None
        if writer is not None:
            writer.join()
        error, self._checkpoint_error = self._checkpoint_error, None
        if error is not None:
            raise error

    def load_checkpoint(self, directory: Path) -> bool:
        path = directory / CHECKPOINT_DIR / CHECKPOINT_FILE
        if not path.is_file():
            return False
        try:
            state = checkpoint_state(path)
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a truncated or corrupted file
            raise PipelineInputError(
                f"{path}: cannot be read ({str(e).splitlines()[0]}); the checkpoint is corrupted: "
                "--no-resume or --force starts over"
            ) from None
        if state["sae_cfg"] != asdict(self.sae_cfg):
            raise PipelineInputError(f"{path}: checkpoint of an incompatible SAE config; use --force or another --out")
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.sae.to(self.info.device)
        for i, p in enumerate(self.sae.parameters()):
            st = {n.split(".", 2)[2]: v for n, v in tensors.items() if n.startswith(f"opt.{i}.")}
            if st:
                st["step"] = st["step"].reshape(())
                self.opt.state[p] = {k: v.to(self.info.device) if k != "step" else v for k, v in st.items()}
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.info.device)
        self.n_dead = self._count_dead()
        torch.set_rng_state(tensors["torch_rng"])
        self.step, self.epoch, self.batch_in_epoch, self.skipped = (
            state["step"],
            state["epoch"],
            state["batch_in_epoch"],
            state["skipped"],
        )
        return True


CHECKPOINT_FILE = "state.safetensors"


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    ckpt = directory / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt / CHECKPOINT_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(state, sort_keys=True)})


def checkpoint_state(path: Path) -> dict:
    """The JSON state (step, epoch, batch_in_epoch, skipped, sae_cfg) stored in a checkpoint file."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def check_ranks_agree(trainer: "Trainer", run_fingerprint: str, out: Path, info: DistInfo) -> None:
    """Every rank resumes from the same position of the same request, or every rank stops with one line.

    A rank on a node without the shared run folder finds no checkpoint and would start at step 0 while
    the others resume: their collectives would then wait on each other forever."""
    if not info.distributed:
        return
    mine = torch.tensor(
        [trainer.step, trainer.epoch, trainer.batch_in_epoch, zlib.crc32(run_fingerprint.encode())],
        dtype=torch.long,
        device=info.device,
    )
    everyone = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(everyone, mine)
    if any(not torch.equal(e, everyone[0]) for e in everyone):
        found = ", ".join(f"rank {r} at step {int(e[0])}" for r, e in enumerate(everyone))
        raise PipelineInputError(
            f"--out {out}: the ranks would resume from different checkpoints or requests ({found}); every node "
            "needs the same run folder and data (a shared filesystem), or start over with --no-resume"
        )
