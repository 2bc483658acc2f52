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

import shlex
import sys

from pipeline.core.cli import parse_config, run_main
from pipeline.steering.config import SteeringEvalConfig
from pipeline.steering.stage import evaluate_steering


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
        return f"{c['on_concept'] or 0:4.0%} {c['concept_any'] or 0:4.0%} {c['harmonic'] or 0:4.2f}"

    def interval(c: dict) -> str:
        low, high = c["on_concept_ci"]
        return f"[{low or 0:.0%}, {high or 0:.0%}]"

    s = doc["summary"]
    print(
        f"\nsteering evaluation at {doc['hook_point']}: {len(doc['test'])} held-out instructions x "
        f"{len(doc['latents'])} latents (strengths x {doc['residual_norm']:.1f}, the stream's mean norm)\n"
        "per method: share of continuations on-concept (concept 2), share with concept >= 1, harmonic score 0-2"
    )
    print(f"{'latent':>7} {'output':>7}  {'sae (@factor)':>21}  {'diffmean (@factor)':>21}  {'prompt':>15}  concept")
    for r in doc["latents"]:
        m = r["methods"]
        print(
            f"{r['latent']:>7} {r['output_score']:7.3f}  {cell(m['sae']['test'])} @{m['sae']['best_factor']:<4}  "
            f"{cell(m['diffmean']['test'])} @{m['diffmean']['best_factor']:<4}  {cell(m['prompt']['test'])}  "
            f"{r['concept'][:40]}"
        )
    print(f"{'all':>7} {'':7}  {cell(s['sae']):>21}  {cell(s['diffmean']):>21}  {cell(s['prompt']):>15}")
    print(
        f"on-concept 95% intervals (resampling latents): sae {interval(s['sae'])}, diffmean "
        f"{interval(s['diffmean'])}, prompt {interval(s['prompt'])}, unsteered {s['unsteered']['on_concept']:.0%} "
        f"{interval(s['unsteered'])}"
    )


def main(cfg: SteeringEvalConfig) -> dict:
    doc = evaluate_steering(cfg)
    print_table(doc)
    print_next_steps(cfg, doc)
    return doc


if __name__ == "__main__":
    run_main(main, parse_config(SteeringEvalConfig, sys.argv[1:], __doc__))
