"""The training stage: the run folder's lifecycle, the training loop with progress, the final validation and
spliced evaluation, the manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llama_3 import load_model
from llama_3.cpu_fast import apply_cpu_fast_paths
from llama_3.errors import PipelineInputError
from pipeline.core import fault_injection
from pipeline.core.distributed import DistInfo, barrier
from pipeline.core.manifest import MANIFEST_NAME, fingerprint, make_manifest, write_json_atomic
from pipeline.core.output_folder import OutputFolder, owned_names
from pipeline.core.prefetch import BatchPrefetcher
from pipeline.sae.config import TrainConfig, run_request
from pipeline.sae.metrics_log import MetricsLog
from pipeline.sae.splice_eval import SpliceTarget, splice_eval_many
from pipeline.sae.training import (
    Trainer,
    batch_order,
    check_ranks_agree,
)
from pipeline.sae.training_run import CHECKPOINT_DIR, METRICS_NAME, RUN_FILE, SAE_SUBDIR, WANDB_ID_NAME
from pipeline.sentences.dataset import sentence_texts


def run_config(cfg: TrainConfig, trainer: "Trainer") -> dict:
    """The W&B run's config: the flags with their "auto" values (lr 0, n_latents 0, k_aux 0) resolved,
    and what the SAE was trained on (hook point, model identity, input scale, width)."""
    sae_cfg = trainer.sae_cfg
    return {
        **asdict(cfg),
        "lr": trainer.peak_lr,
        "n_latents": sae_cfg.n_latents,
        "k_aux": trainer.k_aux,
        "autocast": trainer.autocast,
        "d_model": sae_cfg.d_model,
        "input_scale": sae_cfg.input_scale,
        "hook_point": sae_cfg.hook_point,
        "model": sae_cfg.model,
        "tokenization": asdict(sae_cfg.tokenization),
        "world_size": trainer.info.world_size,
    }


def output_folder(cfg: TrainConfig) -> OutputFolder:
    """The run folder; W&B may keep its own files beside ours."""
    return OutputFolder(
        Path(cfg.out),
        "training run",
        owned_names(RUN_FILE, MANIFEST_NAME, METRICS_NAME, WANDB_ID_NAME, CHECKPOINT_DIR, SAE_SUBDIR),
        progress=(RUN_FILE,),
        finished_files=("sae/sae.safetensors",),
        foreign_ok=True,
    )


class Run:
    """One SAE's training run inside the shared loop (`train_runs`): its trainer, run folder, metrics log and
    progress, from the folder's preparation to its manifest."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, trainer: Trainer, fp: str):
        self.cfg, self.info, self.trainer, self.fp, self.out = cfg, info, trainer, fp, Path(cfg.out)
        if info.is_main:
            write_json_atomic(self.out / RUN_FILE, {"fingerprint": fp, "config": asdict(cfg)})
        barrier(info)
        self.resumed = cfg.resume and trainer.load_checkpoint(self.out)
        check_ranks_agree(trainer, fp, self.out, info)
        self.log = MetricsLog(
            self.out, cfg, info.is_main, run_config(cfg, trainer), resume_step=trainer.step if self.resumed else 0
        )
        self.tokens_run, self.t0 = 0, time.perf_counter()
        self.manifest: dict = {}

    def step(self, start: int, rows: torch.Tensor) -> dict:
        trainer, cfg = self.trainer, self.cfg
        metrics = trainer.train_step(start, rows)
        trainer.batch_in_epoch += 1
        trainer.step += 1
        self.tokens_run += min(cfg.batch_size, len(trainer.train) - start)
        fault_injection.point("training.step")
        if trainer.step % cfg.val_every == 0:
            metrics.update(trainer.validate())
        metrics["train/tokens_per_s"] = self.tokens_run / (time.perf_counter() - self.t0)
        self.log.log(trainer.step, metrics)
        if trainer.step % cfg.checkpoint_every == 0:
            trainer.save_checkpoint(self.out)
        return metrics

    def validate_and_save(self) -> dict:
        """The final validation (every rank takes part), the last checkpoint and, on the main rank, the SAE."""
        final = self.trainer.validate(max_rows=10**9)
        self.trainer.save_checkpoint(self.out, wait=True)
        if self.info.is_main:
            self.trainer.sae.save(self.out / SAE_SUBDIR)
        return final

    def finish(self, elapsed: float, final: dict, spliced: dict) -> dict:
        """The final metrics row and the manifest (main rank), with the spliced evaluation."""
        cfg, info, trainer, out = self.cfg, self.info, self.trainer, self.out
        if not info.is_main:
            self.log.close()
            return {}
        # the final row, with the spliced CE / KL, goes to metrics.jsonl and the W&B run before it finishes
        numbers = {k: v for k, v in spliced.items() if isinstance(v, (int, float))}
        self.log.log(trainer.step, {**final, **numbers, "final": 1})
        self.log.close()
        tokens_per_s = self.tokens_run / max(elapsed, 1e-9)
        manifest = make_manifest(
            "sae",
            config=asdict(cfg),
            inputs={"data": str(cfg.data), "data_fingerprint": trainer.data.fingerprint}
            | (
                {"target_data": str(cfg.target_data), "target_fingerprint": trainer.target.fingerprint}
                if trainer.target
                else {}
            ),
            counts={
                "steps": trainer.step,
                "tokens_seen": trainer.step * cfg.batch_size,
                "skipped_nonfinite_batches": trainer.skipped,
            },
            fingerprint=self.fp,
            sae=asdict(trainer.sae_cfg),
            bf16_autocast=trainer.autocast,
            final_validation=final,
            spliced_evaluation=spliced,
            resumed=self.resumed,
            world_size=info.world_size,
            throughput={"seconds_this_run": round(elapsed, 2), "tokens_per_s": round(tokens_per_s, 1)},
        )
        write_json_atomic(out / MANIFEST_NAME, manifest)
        print(
            f"{out}: {trainer.step} steps; val FVU {final.get('val/fvu', float('nan')):.4f}, L0 "
            f"{final.get('val/l0', 0):.1f}, "
            f"dead {final.get('val/dead_pct', 0):.1f}%, dense {final.get('val/dense_pct', 0):.1f}%; "
            f"{tokens_per_s:.0f} tokens/s"
        )
        if "eval/ce_loss_recovered" in spliced:
            print(
                f"spliced into the model on {spliced['eval/sentences']} held-out sentences: CE clean "
                f"{spliced['eval/ce_clean']:.3f}, "
                f"with SAE {spliced['eval/ce_sae']:.3f}, zero-ablated {spliced['eval/ce_zero_ablation']:.3f} -> "
                f"CE loss recovered {spliced['eval/ce_loss_recovered']:.1%}, KL {spliced['eval/kl_sae']:.3f}"
            )
        return manifest


def open_run(cfg: TrainConfig, info: DistInfo) -> Run | dict:
    """A Run ready to train, or the finished run's manifest when the folder already holds this request."""
    trainer = Trainer(cfg, info)  # checks the flags against the data before the folder is touched
    data_fp = trainer.data.fingerprint + (trainer.target.fingerprint if trainer.target else "")
    fp = fingerprint({**run_request(cfg), "data": data_fp})
    prepared = output_folder(cfg).prepare(fp, cfg.force, info)
    if prepared.state == "reuse":  # every rank reads the same manifest, so all agree to stop here
        done = prepared.manifest
        if info.is_main:
            print(
                f"{cfg.out}: already trained with this data and config (val FVU "
                f"{done['final_validation'].get('val/fvu', float('nan')):.4f}); "
                "--force retrains"
            )
        return done
    return Run(cfg, info, trainer, fp)


def train(cfg: TrainConfig, info: DistInfo) -> dict:
    """One SAE (a transcoder with --target-data), or with --suite every SAE of the list in one pass: each batch
    is read once and every SAE takes its step on it. Returns the manifest (a suite's: {"suite": [...]})."""
    cfgs = suite_configs(cfg) if cfg.suite else [cfg]
    opened = [open_run(c, info) for c in cfgs]
    runs = [r for r in opened if isinstance(r, Run)]
    if runs:
        train_runs(runs, info)
    manifests = [r if isinstance(r, dict) else r.manifest for r in opened]
    return {"suite": manifests} if cfg.suite else manifests[0]


def suite_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """--suite's list: each entry's flags over the command line's; they must share the batch order."""
    path = Path(cfg.suite)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineInputError(f"--suite {path}: not a readable JSON list ({e})") from None
    known = {f.name for f in fields(TrainConfig)} - {"suite"}
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise PipelineInputError(f"--suite {path}: expected a non-empty JSON list of objects of training flags")
    cfgs = []
    for i, entry in enumerate(entries):
        if unknown := sorted(set(entry) - known):
            raise PipelineInputError(f"--suite {path}: entry {i} has unknown flags {unknown}")
        if "out" not in entry:
            raise PipelineInputError(f"--suite {path}: entry {i} names no out folder")
        cfgs.append(replace(cfg, suite="", **entry))
    shared = {(c.batch_size, c.seed, c.epochs) for c in cfgs}
    if len(shared) > 1:
        raise PipelineInputError(f"--suite {path}: every entry needs the same batch_size, seed and epochs (one pass)")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise PipelineInputError(f"--suite {path}: two entries write the same out folder")
    return cfgs


def train_runs(runs: list[Run], info: DistInfo) -> None:
    """The training loop shared by every run: each global batch is read once (every distinct data folder's
    rows side by side, [n, n_folders * d]) and each run steps on its columns."""
    lead = runs[0].trainer
    n_rows = len(lead.train)
    position = {(r.trainer.epoch, r.trainer.batch_in_epoch) for r in runs}
    if any(len(r.trainer.train) != n_rows for r in runs) or len(position) > 1:
        raise PipelineInputError(
            "--suite: the SAEs' data differ in training rows, or their checkpoints stand at different steps "
            "(preprocess every site from one capture with one seed; --force starts the suite over)"
        )
    readers: dict[str, object] = {}  # data folder -> its training rows, in first-use order
    for r in runs:
        readers.setdefault(str(r.cfg.data), r.trainer.train)
        if r.trainer.target_train is not None:
            readers.setdefault(str(r.cfg.target_data), r.trainer.target_train)
    names = list(readers)
    d = lead.data.d_model

    def columns(name: str) -> slice:
        i = names.index(name)
        return slice(i * d, (i + 1) * d)

    def read(start: int) -> torch.Tensor:
        a, b, _ = lead.local_range(start)
        return torch.cat([readers[n][a:b] for n in names], dim=1) if len(names) > 1 else readers[names[0]][a:b]

    def rows_for(run: Run, rows: torch.Tensor) -> torch.Tensor:
        if len(names) == 1:
            return rows
        parts = [rows[:, columns(str(run.cfg.data))]]
        if run.trainer.target_train is not None:
            parts.append(rows[:, columns(str(run.cfg.target_data))])
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    cfg = runs[0].cfg
    bar = tqdm(
        total=lead.total_steps,
        initial=lead.step,
        unit="step",
        disable=not info.is_main,
        dynamic_ncols=True,
        desc="train" if len(runs) == 1 else f"train {len(runs)} SAEs",
    )
    t0 = time.perf_counter()
    while lead.epoch < cfg.epochs:
        order = batch_order(n_rows, cfg.batch_size, cfg.seed, lead.epoch)
        for start, rows in BatchPrefetcher(order[lead.batch_in_epoch :].tolist(), read, info.device):
            metrics = [run.step(int(start), rows_for(run, rows)) for run in runs]
            bar.update(1)
            done = [m for m in metrics if "train/loss" in m]
            if done:
                tokens_per_s = sum(m["train/tokens_per_s"] for m in done) / len(done)
                bar.set_postfix_str(
                    f"loss {np.mean([m['train/loss'] for m in done]):.4f} "
                    f"dead {np.mean([m['debug/dead_latents_ratio'] for m in done]):.1%} "
                    f"{tokens_per_s:.0f} tok/s" + (" per SAE" if len(runs) > 1 else ""),
                    refresh=False,
                )
        for run in runs:
            run.trainer.epoch += 1
            run.trainer.batch_in_epoch = 0
    bar.close()
    elapsed = time.perf_counter() - t0
    finals = [run.validate_and_save() for run in runs]
    spliced = spliced_evaluations(runs, info) if info.is_main else [{} for _ in runs]
    for run, final, result in zip(runs, finals, spliced):
        run.manifest = run.finish(elapsed, final, result)


def spliced_evaluations(runs: list[Run], info: DistInfo) -> list[dict]:
    """CE loss recovered and KL with each SAE spliced into the model, on held-out sentences (main rank): the
    sentences and the model each SAE records it was trained from. SAEs that share them (a suite from one
    capture) are evaluated together: one clean forward per batch for all (splice_eval_many)."""
    results: list[dict] = [{} for _ in runs]
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        cfg, trainer = run.cfg, run.trainer
        trained_on = trainer.sae_cfg.trained_on
        if not cfg.eval_sentences or not trained_on.sentences:
            results[i] = {"skipped": "disabled" if not cfg.eval_sentences else "the data names no sentence set"}
            continue
        held_out = tuple(trainer.data.val_sentence_ids()[: cfg.eval_sentences].tolist())
        key = (trainer.sae.model_path(None), trained_on.sentences, held_out, trainer.sae_cfg.tokenization)
        groups.setdefault(key, []).append(i)
    for (path, sentences, held_out, tokenization), members in groups.items():
        try:
            texts = sentence_texts(sentences, held_out)
            lm = load_model(path, device=info.device, dtype=torch.float32 if info.device.type == "cpu" else None)
        except (PipelineInputError, OSError) as e:
            for i in members:
                results[i] = {"skipped": f"model or sentences unavailable: {e}"}
            continue
        apply_cpu_fast_paths(lm.model)
        targets = []
        for i in members:
            sae = runs[i].trainer.sae.eval()
            if key := sae.model_mismatch(lm.identity()):
                results[i] = {"skipped": f"{lm.path}: not the model the capture ran ({key} differs)"}
                continue
            source = sae.cfg.hook_point if sae.cfg.is_transcoder else None
            targets.append((i, SpliceTarget(sae.reconstruct, sae.cfg.site_hook_point, source)))
        evaluated = splice_eval_many(lm, [t for _, t in targets], texts, tokenization)
        for (i, _), result in zip(targets, evaluated):
            results[i] = result
    return results
