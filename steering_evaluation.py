"""Steering evaluation in the AxBench mould: do SAE latents steer, against DiffMean and prompting?

The latents with the best output score (adding the decoder row makes the model predict the latent's
promoted tokens) are steered with a sweep of strengths on chat instructions; each method is judged on
held-out instructions at its best strength for concept, instruction relevance and fluency (0-2 each,
offline: MiniLM and the clean model; see pipeline/steering/judge.py) and their harmonic mean.

Usage:
    # CPU, the demo run (SAE, top sentences, meanings from the earlier stages)
    python steering_evaluation.py
    # chosen latents, another strength sweep
    python steering_evaluation.py --latents 100 2627 --factors 0.3 0.6 1.2 --force
    # one GPU (the model runs in bf16), more candidates
    python steering_evaluation.py --device cuda --n-candidates 100
Output: runs/steering_eval/results.json (+ manifest.json); a re-run with the same inputs and config reuses it.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from llama_3.errors import PipelineInputError
from pipeline.capture.activations import CaptureOutput
from pipeline.core.cli import Dtype, check_choices, parse_config, run_main
from pipeline.core.layout import MEANINGS_DIR, SAE_WEIGHTS_DIR, STEERING_EVAL_DIR, TOP_SENTENCES_DIR
from pipeline.core.manifest import MANIFEST_NAME, fingerprint, make_manifest, sha256_file, write_json_atomic
from pipeline.core.output_folder import OutputFolder, config_request, owned_names
from pipeline.interpret.batches import DEFAULT_MODEL, make_client
from pipeline.interpret.embedding import SentenceEncoder
from pipeline.interpret.explainers import LatentExamples
from pipeline.sae.formats import sae_sha256, sae_weights_file
from pipeline.steering.evaluation import SELECT_INSTRUCTIONS, TEST_INSTRUCTIONS, Benchmark, evaluate
from pipeline.steering.judge import run_claude_judge
from pipeline.steering.session import Session
from pipeline.top_sentences.tables import open_top_sentences

KIND = "steering_eval"
Judge = Literal["offline", "claude"]
REQUEST_NAME = "request.json"  # which request the Claude batch state belongs to
# in the fingerprint: a results.json of an older method is not reused (2: concept output score; 3: the judge
# embeds the meaning's key words)
METHOD_VERSION = 3


@dataclass
class SteeringEvalConfig:
    sae: str = field(default=str(SAE_WEIGHTS_DIR), metadata={"help": "SAE folder"})
    top_sentences: str = field(
        default=str(TOP_SENTENCES_DIR), metadata={"help": "top-sentences output (examples for DiffMean and the judge)"}
    )
    meanings: str = field(
        default=str(MEANINGS_DIR), metadata={"fingerprint": False, "help": "folder of latent meanings"}
    )
    out: str = field(default=str(STEERING_EVAL_DIR), metadata={"fingerprint": False, "help": "output folder"})
    model: str | None = field(default=None, metadata={"help": "default: the SAE's model"})
    latents: list[int] = field(
        default_factory=list,
        metadata={"help": "latents to evaluate (default: the --n-candidates with the best output score)"},
    )
    n_candidates: int = field(default=20, metadata={"help": "how many of the latents with the best output score"})
    factors: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.4],
        metadata={"help": "strengths swept, as multiples of the stream's mean norm at the hook"},
    )
    output_factor: float = field(default=0.2, metadata={"help": "strength of the output score's steering"})
    select_instructions: list[str] = field(
        default_factory=lambda: list(SELECT_INSTRUCTIONS), metadata={"help": "chat instructions the sweep runs on"}
    )
    test_instructions: list[str] = field(
        default_factory=lambda: list(TEST_INSTRUCTIONS),
        metadata={"help": "held-out chat instructions the best strengths are reported on"},
    )
    max_new_tokens: int = field(default=32, metadata={"help": "tokens per continuation"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    judge: Judge = field(
        default="offline",
        metadata={"help": "offline (MiniLM + the clean model), or claude as well (needs ANTHROPIC_API_KEY)"},
    )
    claude_model: str = field(default=DEFAULT_MODEL, metadata={"help": "the Claude judge's model"})
    poll_seconds: float = field(default=60.0, metadata={"fingerprint": False, "help": "Claude batch polling interval"})
    timeout_minutes: float = field(
        default=0.0, metadata={"fingerprint": False, "help": "stop waiting for Claude batches after this (0: never)"}
    )
    base_url: str | None = field(
        default=None, metadata={"fingerprint": False, "help": "API base URL (default: the SDK's; e.g. a test server)"}
    )
    batch_rows: int = field(
        default=256,
        metadata={
            "fingerprint": False,
            "help": "continuations generated per batch; greedy results do not depend on it",
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
    sae_file = sae_weights_file(cfg.sae)
    try:  # new top sentences (the judge's references, DiffMean's examples) evaluate again
        top = open_top_sentences(cfg.top_sentences).fingerprint
    except PipelineInputError:  # refused with its own line once the evaluation opens it
        top = None
    return fingerprint(
        {
            "sae": sae_sha256(cfg.sae) if sae_file.is_file() else None,
            "meanings": meanings,
            "top": top,
            "method": METHOD_VERSION,
            **keys,
        }
    )


def main(cfg: SteeringEvalConfig) -> dict:
    out = Path(cfg.out)
    request = request_fingerprint(cfg)
    folder = OutputFolder(  # new meanings or a new SAE: evaluate again (replace_other)
        out,
        "steering evaluation",
        owned_names(MANIFEST_NAME, "results.json", "claude_judge"),
        finished_files=("results.json",),
        progress=(f"claude_judge/{REQUEST_NAME}",),  # a killed run waiting on Claude batches resumes them
        foreign_ok=True,
        replace_other=True,
    )
    if folder.prepare(request, cfg.force).state == "reuse":
        print(f"{out}: already complete for this SAE, meanings and config (use --force to recompute)")
        results = json.loads((out / "results.json").read_text())
        print_table(results)
        print_next_steps(cfg, results)
        return results
    if cfg.batch_rows < 1 or cfg.n_candidates < 1 or cfg.max_new_tokens < 1:
        raise PipelineInputError("--batch-rows, --n-candidates and --max-new-tokens must be >= 1")
    if not cfg.factors or min(cfg.factors) <= 0 or cfg.output_factor <= 0:
        raise PipelineInputError(f"--factors {cfg.factors} / --output-factor: need at least one, every one > 0")
    if len(cfg.select_instructions) < 1 or len(cfg.test_instructions) < 1:
        raise PipelineInputError("--select-instructions and --test-instructions need one instruction each at least")

    top = open_top_sentences(cfg.top_sentences)
    session = Session.open(cfg.model, cfg.sae, cfg.meanings, cfg.device, cfg.dtype)
    steerable = session.steerable
    examples = LatentExamples.load(top, "max")
    meanings = {lat: steerable.meaning(lat) for lat in steerable.meanings if steerable.meaning(lat)}
    if cfg.latents:
        unknown = [lat for lat in cfg.latents if lat not in meanings or lat not in examples.top]
        if unknown:
            raise PipelineInputError(
                f"--latents {unknown[:5]}: no meaning in {cfg.meanings} or never fire in {cfg.top_sentences}"
            )
        pool = list(cfg.latents)
    else:
        pool = sorted(lat for lat in meanings if lat in examples.top)
    if not pool:
        raise PipelineInputError(
            f"--meanings {cfg.meanings}: no meanings for this SAE (run the interpretation stages) and no --latents "
            "given"
        )

    def claude(items: list[dict]) -> dict[int, dict]:
        (out / "claude_judge").mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "claude_judge" / REQUEST_NAME, {"fingerprint": request})
        return run_claude_judge(
            items, out / "claude_judge", cfg.base_url, cfg.poll_seconds, cfg.timeout_minutes, cfg.claude_model
        )

    if cfg.judge == "claude":
        make_client(cfg.base_url)  # no key: one line now, not after the generations
    start = time.time()
    capture, capture_sentences = top_sentences_capture(top)
    bench = Benchmark(
        session,
        SentenceEncoder(),
        examples,
        meanings,
        cfg.select_instructions,
        cfg.test_instructions,
        capture,
        capture_sentences,
    )
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed}
    doc = evaluate(
        bench,
        pool,
        len(pool) if cfg.latents else cfg.n_candidates,
        list(cfg.factors),
        cfg.output_factor,
        sampling,
        cfg.batch_rows,
        progress=lambda total, desc: tqdm(total=total, desc=desc, unit="row"),
        claude_judge=claude if cfg.judge == "claude" else None,
    )
    elapsed = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", doc)
    manifest = make_manifest(
        KIND,
        config=asdict(cfg),
        inputs={
            "sae": cfg.sae,
            "sae_sha256": sae_sha256(cfg.sae),
            "top_sentences": cfg.top_sentences,
            "top_sentences_fingerprint": top.fingerprint,
            "model": session.loaded.identity(),
        },
        counts={"latents": len(doc["latents"]), "pool": len(pool), "seconds": round(elapsed, 1)},
        fingerprint=request,
    )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    print_table(doc)
    print(f"wrote {out / 'results.json'} ({elapsed:.0f} s)")
    print_next_steps(cfg, doc)
    return doc


def top_sentences_capture(top) -> tuple[CaptureOutput | None, int]:
    """The capture top sentences read its activations from (it checked that capture against the SAE), and
    how many sentences it read there; (None, 0) when it ran the model."""
    try:
        source = top.field("source", dict)
    except PipelineInputError:  # written before top sentences could read a capture
        return None, 0
    if not source.get("capture") or not source.get("capture_sentences"):
        return None, 0
    try:
        return CaptureOutput.open(source["capture"]), int(source["capture_sentences"])
    except PipelineInputError:  # moved or deleted since: DiffMean runs the model instead
        return None, 0


def print_next_steps(cfg: SteeringEvalConfig, doc: dict) -> None:
    """The page, and the terminal CLI steering the best SAE latent at its recommended `add` strength on a
    held-out instruction, greedy: one of the continuations the evaluation judged."""
    sae = "" if cfg.sae == SteeringEvalConfig.sae else f" --sae {cfg.sae}"
    steerable = [r for r in doc["latents"] if r["methods"]["sae"].get("add_strength")]
    best = max(steerable, key=lambda r: r["methods"]["sae"]["test"]["harmonic"] or 0.0, default=None)
    entry = f"{best['latent']}:add:{best['methods']['sae']['add_strength']:.6g}" if best else "LATENT:add:STRENGTH"
    print(
        f"\nsteer it yourself:  python llama_3_inference_text_completion_gradio.py{sae}   then open http://127.0.0.1:7860"
        f"\n                    python llama_3_inference.py --sae {cfg.sae} --steer {entry} --inspect 5 "
        f"--chat {shlex.quote(cfg.test_instructions[0])} --temperature 0   (a held-out instruction, as evaluated)"
    )


def print_table(doc: dict) -> None:
    def cell(c: dict) -> str:
        return f"{c['harmonic']:4.2f} {c['on_concept']:4.0%} {c['loss_ratio']:4.1f}x"

    print(
        f"\nsteering evaluation at {doc['hook_point']} (held-out instructions; strengths x {doc['residual_norm']:.1f}, "
        "the stream's mean norm)\nper method: harmonic score 0-2, on-concept share, fluency loss vs unsteered"
    )
    print(f"{'latent':>7} {'output':>7}  {'sae (best factor)':>22}  {'diffmean':>22}  {'prompt':>15}  meaning")
    for r in doc["latents"]:
        m = r["methods"]
        print(
            f"{r['latent']:>7} {r['output_score']:7.3f}  {cell(m['sae']['test'])} @{m['sae']['best_factor']:<4}  "
            f"{cell(m['diffmean']['test'])} @{m['diffmean']['best_factor']:<4}  {cell(m['prompt']['test'])}  "
            f"{r['meaning'][:40]}"
        )
    s = doc["summary"]
    print(
        f"{'mean':>7} {'':7}  {cell(s['sae']):>22}  {cell(s['diffmean']):>22}  {cell(s['prompt']):>15}"
        f"\nunsteered on-concept {s['unsteered']['on_concept']:.0%}; judge agrees with the key-word rate on "
        f"{s['judge_keyword_agreement']:.0%} of steered continuations"
    )


if __name__ == "__main__":
    run_main(main, parse_config(SteeringEvalConfig, sys.argv[1:], __doc__))
