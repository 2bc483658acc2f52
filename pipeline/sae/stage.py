"""The training stage: the run folder's lifecycle, the training loop with progress, the final validation and
spliced evaluation, the manifest.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from llama_3 import load_model
from llama_3.cpu_fast import apply_cpu_fast_paths
from llama_3.errors import PipelineInputError
from pipeline.core import fault_injection
from pipeline.core.distributed import DistInfo, barrier
from pipeline.core.manifest import MANIFEST_NAME, fingerprint, make_manifest, write_json_atomic
from pipeline.core.output_folder import OutputFolder, config_request, owned_names
from pipeline.core.prefetch import BatchPrefetcher
from pipeline.sae.config import TrainConfig
from pipeline.sae.metrics_log import MetricsLog
from pipeline.sae.splice_eval import splice_eval
from pipeline.sae.training import (
    Trainer,
    batch_order,
    check_ranks_agree,
)
from pipeline.sae.training_run import CHECKPOINT_DIR, METRICS_NAME, RUN_FILE, SAE_SUBDIR, WANDB_ID_NAME
from pipeline.sentences.dataset import iter_sentences


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


def train(cfg: TrainConfig, info: DistInfo) -> dict:
    out = Path(cfg.out)
    trainer = Trainer(cfg, info)  # checks the flags against the data before the folder is touched
    fp = fingerprint({**config_request(cfg), "data": trainer.data.fingerprint})
    prepared = output_folder(cfg).prepare(fp, cfg.force, info)
    if prepared.state == "reuse":  # every rank reads the same manifest, so all agree to stop here
        done = prepared.manifest
        if info.is_main:
            print(
                f"{out}: already trained with this data and config (val FVU "
                f"{done['final_validation'].get('val/fvu', float('nan')):.4f}); "
                "--force retrains"
            )
        return done
    if info.is_main:
        write_json_atomic(out / RUN_FILE, {"fingerprint": fp, "config": asdict(cfg)})
    barrier(info)
    resumed = cfg.resume and trainer.load_checkpoint(out)
    check_ranks_agree(trainer, fp, out, info)
    log = MetricsLog(out, cfg, info.is_main, run_config(cfg, trainer), resume_step=trainer.step if resumed else 0)
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.step,
        unit="step",
        disable=not info.is_main,
        dynamic_ncols=True,
        desc="train",
    )
    t0, tokens_run = time.perf_counter(), 0
    while trainer.epoch < cfg.epochs:
        order = batch_order(len(trainer.train), cfg.batch_size, cfg.seed, trainer.epoch)
        batches = BatchPrefetcher(order[trainer.batch_in_epoch :].tolist(), trainer.local_rows, info.device)
        for start, rows in batches:
            metrics = trainer.train_step(int(start), rows)
            trainer.batch_in_epoch += 1
            trainer.step += 1
            tokens_run += min(cfg.batch_size, len(trainer.train) - start)
            fault_injection.point("training.step")
            if trainer.step % cfg.val_every == 0:
                metrics.update(trainer.validate())
            metrics["train/tokens_per_s"] = tokens_run / (time.perf_counter() - t0)
            log.log(trainer.step, metrics)
            bar.update(1)
            if "train/loss" in metrics:
                bar.set_postfix_str(
                    f"loss {metrics['train/loss']:.4f} dead {metrics['debug/dead_latents_ratio']:.1%} "
                    f"{metrics['train/tokens_per_s']:.0f} tok/s",
                    refresh=False,
                )
            if trainer.step % cfg.checkpoint_every == 0:
                trainer.save_checkpoint(out)
        trainer.epoch += 1
        trainer.batch_in_epoch = 0
    bar.close()
    elapsed = time.perf_counter() - t0
    final = trainer.validate(max_rows=10**9)
    trainer.save_checkpoint(out, wait=True)
    if not info.is_main:
        log.close()
        return {}
    trainer.sae.save(out / SAE_SUBDIR)
    spliced = spliced_evaluation(cfg, trainer, info)
    # the final row, with the spliced CE / KL, goes to metrics.jsonl and the W&B run before it finishes
    log.log(trainer.step, {**final, **{k: v for k, v in spliced.items() if isinstance(v, (int, float))}, "final": 1})
    log.close()
    manifest = make_manifest(
        "sae",
        config=asdict(cfg),
        inputs={"data": str(cfg.data), "data_fingerprint": trainer.data.fingerprint},
        counts={
            "steps": trainer.step,
            "tokens_seen": trainer.step * cfg.batch_size,
            "skipped_nonfinite_batches": trainer.skipped,
        },
        fingerprint=fp,
        sae=asdict(trainer.sae_cfg),
        bf16_autocast=trainer.autocast,
        final_validation=final,
        spliced_evaluation=spliced,
        resumed=resumed,
        world_size=info.world_size,
        throughput={"seconds_this_run": round(elapsed, 2), "tokens_per_s": round(tokens_run / max(elapsed, 1e-9), 1)},
    )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    print(
        f"{out}: {trainer.step} steps; val FVU {final.get('val/fvu', float('nan')):.4f}, L0 "
        f"{final.get('val/l0', 0):.1f}, "
        f"dead {final.get('val/dead_pct', 0):.1f}%, dense {final.get('val/dense_pct', 0):.1f}%; "
        f"{tokens_run / max(elapsed, 1e-9):.0f} tokens/s"
    )
    if "eval/ce_loss_recovered" in spliced:
        print(
            f"spliced into the model on {spliced['eval/sentences']} held-out sentences: CE clean "
            f"{spliced['eval/ce_clean']:.3f}, "
            f"with SAE {spliced['eval/ce_sae']:.3f}, zero-ablated {spliced['eval/ce_zero_ablation']:.3f} -> "
            f"CE loss recovered {spliced['eval/ce_loss_recovered']:.1%}, KL {spliced['eval/kl_sae']:.3f}"
        )
    return manifest


def spliced_evaluation(cfg: TrainConfig, trainer: Trainer, info: DistInfo) -> dict:
    """CE loss recovered and KL with the SAE spliced into the model, on held-out sentences (main rank): the
    sentences and the model the SAE records it was trained from."""
    trained_on = trainer.sae_cfg.trained_on
    if not cfg.eval_sentences or not trained_on.sentences:
        return {"skipped": "disabled" if not cfg.eval_sentences else "the data names no sentence set"}
    sae = trainer.sae.eval()
    try:
        wanted = set(trainer.data.val_sentence_ids()[: cfg.eval_sentences].tolist())
        texts = []
        for part in iter_sentences(trained_on.sentences):
            texts += [t for s, t in zip(part["sentence_id"], part["text"]) if s in wanted]
            if len(texts) >= len(wanted):
                break
        lm = load_model(
            sae.model_path(None),
            device=info.device,
            dtype=torch.float32 if info.device.type == "cpu" else None,
        )
    except (PipelineInputError, OSError) as e:
        return {"skipped": f"model or sentences unavailable: {e}"}
    if key := sae.model_mismatch(lm.identity()):
        return {"skipped": f"{lm.path}: not the model the capture ran ({key} differs)"}
    apply_cpu_fast_paths(lm.model)
    return splice_eval(
        lm,
        sae.reconstruct,
        texts,
        trainer.sae_cfg.site_hook_point,
        trainer.sae_cfg.tokenization,
        source=trainer.sae_cfg.hook_point if trainer.sae_cfg.is_transcoder else None,
    )
