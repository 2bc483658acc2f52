"""Steering evaluation: for the highest-certainty latents, does steering make the text carry the latent?

Each latent is steered in each mode on a fixed set of prompts; the continuations are re-encoded
with the SAE (see pipeline/steering_eval.py) and compared with the unsteered continuations.

Usage:
    # CPU, the demo run (SAE, top sentences, meanings from the earlier stages)
    python steering_evaluation.py
    # chosen latents, stronger steering, sampled continuations
    python steering_evaluation.py --latents 100 2627 --strength-factor 8 --temperature 0.7 --force
    # one GPU (the model runs in bf16)
    python steering_evaluation.py --device cuda --n-latents 50
Output: runs/steering_eval/results.json (+ manifest.json); a re-run with the same inputs and config reuses it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from llama_3.cli import Dtype, check_choices, parse_config, run_main
from llama_3.errors import PipelineInputError
from llama_3.generation import SpliceOn, check_splice_on
from pipeline.manifest import (
    MANIFEST_NAME,
    fingerprint,
    make_manifest,
    sha256_file,
    write_json_atomic,
)
from pipeline.meanings import sae_sha256
from pipeline.paths import SAE_DIR, STEERING_EVAL_DIR, TOP_SENTENCES_DIR
from pipeline.steering import MODES, Mode, SteeringEntry
from pipeline.output_folder import OutputFolder, config_request, owned_names
from pipeline.steering_session import Session
from pipeline.steering_eval import (
    DEFAULT_PROMPTS,
    generate_rows,
    latent_scales,
    meaning_keywords,
    select,
    summarize,
)

KIND = "steering_eval"


@dataclass
class SteeringEvalConfig:
    sae: str = field(default=str(SAE_DIR / "sae"), metadata={"help": "SAE folder"})
    top_sentences: str = field(
        default=str(TOP_SENTENCES_DIR), metadata={"help": "top-sentences output (for each latent's activation scale)"}
    )
    meanings: str = field(
        default="latent_index_meaning", metadata={"fingerprint": False, "help": "folder of latent meanings"}
    )
    out: str = field(default=str(STEERING_EVAL_DIR), metadata={"fingerprint": False, "help": "output folder"})
    model: str | None = field(default=None, metadata={"help": "default: the SAE's model"})
    latents: list[int] = field(
        default_factory=list,
        metadata={"help": "latents to evaluate (default: the --n-latents with the highest certainty)"},
    )
    n_latents: int = field(default=8, metadata={"help": "how many of the highest-certainty latents"})
    modes: list[Mode] = field(default_factory=lambda: list(MODES), metadata={"help": "steering modes to evaluate"})
    strength_factor: float = field(
        default=4.0, metadata={"help": "strength = factor x the latent's largest corpus activation"}
    )
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS), metadata={"help": "prompts to continue"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens per continuation"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    steer_on: SpliceOn = field(default="all", metadata={"help": "all, prompt, generated"})
    keep_error: bool = field(default=True, metadata={"help": "keep the SAE error term (else: pure reconstruction)"})
    batch_rows: int = field(
        default=256,
        metadata={
            "fingerprint": False,
            "help": "(latent, mode, prompt) rows generated per batch (0: all at once; the number of prompts: one "
            "latent and mode at a time); greedy results do not depend on it",
        },
    )
    device: str = field(default="auto", metadata={"fingerprint": False, "help": "auto, cpu, cuda"})
    dtype: Dtype = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    force: bool = field(default=False, metadata={"fingerprint": False, "help": "recompute even if the output matches"})

    def __post_init__(self) -> None:
        check_choices(self)


def request_fingerprint(cfg: SteeringEvalConfig) -> str:
    keys = config_request(cfg)
    meanings = (
        sorted(p.name + sha256_file(p) for p in Path(cfg.meanings).glob("*.json"))
        if Path(cfg.meanings).is_dir()
        else []
    )
    sae_file = Path(cfg.sae) / "sae.safetensors"
    return fingerprint({"sae": sae_sha256(cfg.sae) if sae_file.is_file() else None, "meanings": meanings, **keys})


def main(cfg: SteeringEvalConfig) -> dict:
    out = Path(cfg.out)
    request = request_fingerprint(cfg)
    folder = OutputFolder(  # new meanings or a new SAE: evaluate again (replace_other)
        out,
        "steering evaluation",
        owned_names(MANIFEST_NAME, "results.json"),
        finished_files=("results.json",),
        foreign_ok=True,
        replace_other=True,
    )
    if folder.prepare(request, cfg.force).state == "reuse":
        print(f"{out}: already complete for this SAE, meanings and config (use --force to recompute)")
        results = json.loads((out / "results.json").read_text())
        print_table(results)
        print_next_steps(cfg)
        return results
    if not cfg.modes:
        raise PipelineInputError(f"--modes: name at least one of {', '.join(MODES)}")
    if cfg.batch_rows < 0:
        raise PipelineInputError(f"--batch-rows {cfg.batch_rows}: must be >= 0 (0: every row in one batch)")
    if not cfg.prompts or cfg.max_new_tokens < 1 or cfg.strength_factor <= 0:
        raise PipelineInputError("--prompts must be non-empty, --max-new-tokens >= 1, --strength-factor > 0")
    check_splice_on(cfg.steer_on)

    session = Session.open(cfg.model, cfg.sae, cfg.meanings, cfg.device, cfg.dtype)
    steerable = session.steerable
    latents = list(cfg.latents) or steerable.best_latents(cfg.n_latents)
    if not latents:
        raise PipelineInputError(
            f"--meanings {cfg.meanings}: no meanings for this SAE (run the interpretation stages) and no --latents "
            "given"
        )
    scales = latent_scales(cfg.top_sentences)
    missing = [lat for lat in latents if scales.get(lat, 0) <= 0]
    if missing:
        raise PipelineInputError(
            f"--latents {missing[:5]}: never fire in {cfg.top_sentences}, so they have no activation scale"
        )
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed}
    prompts = session.text_prompts(cfg.prompts)

    start = time.time()
    # Every (latent, mode, prompt) row and the unsteered prompts, generated together in batches of
    # --batch-rows: each row carries its own steering entry into the splice.
    groups = [(None, None)] + [(latent, mode) for latent in latents for mode in cfg.modes]
    entries = {
        (latent, mode): [SteeringEntry(latent, mode, cfg.strength_factor * scales[latent])]
        for latent, mode in groups[1:]
    }
    rows = [(p, entries.get(g, [])) for g in groups for p in prompts]
    with tqdm(total=len(rows), desc="steering eval", unit="row") as bar:
        generated = generate_rows(
            session, rows, sampling | {"splice_on": cfg.steer_on}, cfg.keep_error, cfg.batch_rows or len(rows), bar
        )
    group_of = {g: select(generated, range(i * len(prompts), (i + 1) * len(prompts))) for i, g in enumerate(groups)}
    unsteered = group_of[(None, None)]
    results = []
    for latent in latents:
        meaning = steerable.meaning(latent)
        keywords = meaning_keywords(meaning)
        row = {
            "latent": latent,
            "meaning": meaning,
            "certainty": steerable.meanings.get(latent, {}).get("certainty"),
            "keywords": keywords,
            "scale": round(scales[latent], 4),
            "unsteered": summarize(latent, unsteered, keywords),
            "modes": {},
        }
        for mode in cfg.modes:
            steered = group_of[(latent, mode)]
            row["modes"][mode] = {
                "strength": round(entries[(latent, mode)][0].strength, 4),
                **summarize(latent, steered, keywords),
                "example": steered.texts[0],
            }
        results.append(row)
    elapsed = time.time() - start
    doc = {"latents": results, "unsteered_examples": unsteered.texts, "summary": overall(results, cfg.modes)}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", doc)
    manifest = make_manifest(
        KIND,
        config=asdict(cfg),
        inputs={
            "sae": cfg.sae,
            "sae_sha256": sae_sha256(cfg.sae),
            "top_sentences": cfg.top_sentences,
            "model": session.loaded.identity(),
        },
        counts={"latents": len(results), "prompts": len(prompts), "seconds": round(elapsed, 1)},
        fingerprint=request,
    )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    print_table(doc)
    print(f"wrote {out / 'results.json'} ({elapsed:.0f} s)")
    print_next_steps(cfg)
    return doc


def print_next_steps(cfg: SteeringEvalConfig) -> None:
    sae = "" if cfg.sae == SteeringEvalConfig.sae else f" --sae {cfg.sae}"
    print(
        f"\nsteer it yourself:  python llama_3_inference_text_completion_gradio.py{sae}   then open http://127.0.0.1:7860"
        f"\n                    python llama_3_inference.py --sae {cfg.sae} "
        '--steer LATENT:clamp:8 --inspect 5 --prompt "..."'
    )


SUMMARY_KEYS = ("activation", "in_stream", "firing", "keyword_rate", "repetition")


def overall(results: list[dict], modes: list[str]) -> dict:
    """Means over latents, per mode: how much steering raised the latent and the key-word rate."""

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    summary = {"unsteered": {k: mean([r["unsteered"][k] for r in results]) for k in SUMMARY_KEYS}}
    for mode in modes:
        rows = [r["modes"][mode] for r in results]
        summary[mode] = {k: mean([x[k] for x in rows]) for k in SUMMARY_KEYS}
        summary[mode]["raised"] = mean(
            [float(r["modes"][mode]["activation"] > r["unsteered"]["activation"]) for r in results]
        )
    return summary


def print_table(doc: dict) -> None:
    modes = [m for m in doc["summary"] if m != "unsteered"]

    def cell(c: dict) -> str:
        return f"{c['activation']:5.2f} {c['firing']:4.0%} {c['in_stream']:5.2f} {c['keyword_rate']:4.0%}"

    print(
        "\nsteering evaluation, per latent and mode: activation on the re-encoded continuation, its firing rate,"
        "\nactivation in the steered stream, share of continuations with a key word of the meaning"
    )
    print(f"{'latent':>7}  " + "  ".join(f"{m:>21}" for m in ["unsteered"] + modes) + "  meaning")
    for r in doc["latents"]:
        print(
            f"{r['latent']:>7}  "
            + "  ".join(cell(c) for c in [r["unsteered"]] + [r["modes"][m] for m in modes])
            + f"  {r['meaning'][:48]}"
        )
    s = doc["summary"]
    print(f"{'mean':>7}  " + "  ".join(cell(s[m]) for m in ["unsteered"] + modes))
    print(
        f"{'raised':>7}  {'':21}  "
        + "  ".join(f"{s[m]['raised']:>21.0%}" for m in modes)
        + "  (latents whose text activation rose)"
    )


if __name__ == "__main__":
    run_main(main, parse_config(SteeringEvalConfig, sys.argv[1:], __doc__))
