"""The steering evaluation stage: the request (SAE, meanings, top sentences, config), the benchmark run,
results.json and the manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from llama_3.errors import PipelineInputError
from pipeline.capture.activations import CaptureOutput
from pipeline.core.manifest import MANIFEST_NAME, fingerprint, make_manifest, sha256_file, write_json_atomic
from pipeline.core.output_folder import OutputFolder, config_request, owned_names
from pipeline.interpret.batches import make_client
from pipeline.interpret.embedding import SentenceEncoder
from pipeline.interpret.explainers import LatentExamples
from pipeline.interpret.meanings import load_meanings
from pipeline.sae.formats import load_sae, sae_sha256, sae_weights_file
from pipeline.steering.config import SteeringEvalConfig
from pipeline.steering.evaluation import Benchmark, evaluate
from pipeline.steering.judge import run_claude_judge
from pipeline.steering.results import CLAUDE_JUDGE_DIR, KIND, REQUEST_NAME, RESULTS_NAME
from pipeline.steering.session import Session
from pipeline.top_sentences.tables import TopSentences, open_top_sentences

# in the fingerprint: a results.json of an older method is not reused (2: concept output score; 3: the judge
# embeds the meaning's key words; 4: every row kept, concept words, factors that change the text)
METHOD_VERSION = 4


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


def evaluate_steering(cfg: SteeringEvalConfig) -> dict:
    out = Path(cfg.out)
    if not sae_weights_file(cfg.sae).is_file():
        load_sae(cfg.sae)  # the one-line error that says what is wrong with the folder
    request = request_fingerprint(cfg)
    folder = OutputFolder(  # new meanings or a new SAE: evaluate again (replace_other)
        out,
        "steering evaluation",
        owned_names(MANIFEST_NAME, RESULTS_NAME, CLAUDE_JUDGE_DIR),
        finished_files=(RESULTS_NAME,),
        progress=(f"{CLAUDE_JUDGE_DIR}/{REQUEST_NAME}",),  # a killed run waiting on Claude batches resumes them
        foreign_ok=True,
        replace_other=True,
    )
    if folder.prepare(request, cfg.force).state == "reuse":
        print(f"{out}: already complete for this SAE, meanings and config (use --force to recompute)")
        return json.loads((out / RESULTS_NAME).read_text())
    if cfg.batch_rows < 1 or cfg.n_candidates < 1 or cfg.max_new_tokens < 1:
        raise PipelineInputError("--batch-rows, --n-candidates and --max-new-tokens must be >= 1")
    if not cfg.factors or min(cfg.factors) <= 0 or cfg.output_factor <= 0:
        raise PipelineInputError(f"--factors {cfg.factors} / --output-factor: need at least one, every one > 0")
    if len(cfg.select_instructions) < 1 or len(cfg.test_instructions) < 1:
        raise PipelineInputError("--select-instructions and --test-instructions need one instruction each at least")

    top = open_top_sentences(cfg.top_sentences)
    examples = LatentExamples.load(top, "max")
    # the meanings and --latents are checked before the model loads
    found = load_meanings(cfg.meanings, sae_sha256(cfg.sae))
    meanings = {lat: m["meaning"] for lat, m in found.items() if m.get("meaning")}
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
    session = Session.open(cfg.model, cfg.sae, cfg.meanings, cfg.device, cfg.dtype)
    steerable = session.steerable

    def claude(items: list[dict]) -> dict[int, dict]:
        (out / CLAUDE_JUDGE_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / CLAUDE_JUDGE_DIR / REQUEST_NAME, {"fingerprint": request})
        return run_claude_judge(
            items, out / CLAUDE_JUDGE_DIR, cfg.base_url, cfg.poll_seconds, cfg.timeout_minutes, cfg.claude_model
        )

    if cfg.judge == "claude":
        make_client(cfg.base_url)  # no key: one line now, not after the generations
    start = time.time()
    capture, capture_sentences = top_sentences_capture(top, steerable.sae.cfg)
    bench = Benchmark(
        session,
        SentenceEncoder(),
        examples,
        meanings,
        cfg.select_instructions,
        cfg.test_instructions,
        capture,
        capture_sentences,
        explicit=bool(cfg.latents),
        sae_mode=cfg.sae_mode,
        keep_error=cfg.keep_error,
    )
    sampling = {
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "splice_on": cfg.steer_on,
    }
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
    write_json_atomic(out / RESULTS_NAME, doc)
    manifest = make_manifest(
        KIND,
        config=asdict(cfg),
        inputs={
            "sae": cfg.sae,
            "sae_sha256": steerable.sae.sha256,
            "top_sentences": cfg.top_sentences,
            "top_sentences_fingerprint": top.fingerprint,
            "model": session.loaded.identity(),
        },
        counts={"latents": len(doc["latents"]), "pool": len(pool), "seconds": round(elapsed, 1)},
        fingerprint=request,
    )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    print(f"wrote {out / RESULTS_NAME} ({elapsed:.0f} s)")
    return doc


def top_sentences_capture(top: TopSentences, sae_cfg) -> tuple[CaptureOutput | None, int]:
    """The capture top sentences read its activations from (it checked that capture against the SAE), and
    how many sentences it read there; (None, 0) when it ran the model, or when the path no longer leads to a
    capture of this hook point (moved, deleted, or a relative path read from another folder: DiffMean then
    runs the model instead)."""
    if top.source_capture is None or not top.capture_sentences:
        return None, 0
    try:
        capture = CaptureOutput.open(top.source_capture)
    except PipelineInputError:
        return None, 0
    trained_on = sae_cfg.trained_on.capture_fingerprint
    if sae_cfg.site_hook_point not in capture.hook_points or (trained_on and capture.fingerprint != trained_on):
        return None, 0
    return capture, top.capture_sentences
