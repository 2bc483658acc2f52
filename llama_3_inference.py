"""Batched, streaming text and chat completion with the pure-PyTorch Llama 3, steerable through an SAE.

Usage:
    # CPU, embedded default (SmolLM2-135M-Instruct): a demo text completion and chat completion
    python llama_3_inference.py
    # steer with the demo SAE: clamp latent 100 to 8 (modes h_bias / clamp / add), unsteered beside it,
    # and show the 5 strongest latents (with meanings) on every generated token
    python llama_3_inference.py --sae runs/sae/sae --steer 100:clamp:8 --prompt "My favourite food is" --inspect 5
    # find latents by meaning; a multi-turn chat in the terminal (/steer, /search, /reset inside)
    python llama_3_inference.py --sae runs/sae/sae --search "bone"
    python llama_3_inference.py --sae runs/sae/sae --interactive --steer 100:h_bias:4
    # any checkpoint (Meta dir, HF dir, GGUF file), on one GPU in bf16
    python llama_3_inference.py --model ~/models/Llama-3.2-3B-Instruct --device cuda \\
        --chat "Name three rivers in Europe." --temperature 0
    # several prompts of different lengths in one batch
    python llama_3_inference.py --prompt "The capital of France is" "Water boils at" --temperature 0

Library: generation is llama_3/generation.py (`Generator`), the steering session pipeline/steering/session.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from llama_3.errors import PipelineInputError
from llama_3.generation import SpliceOn, chat_tokens, check_splice_on
from pipeline.core.cli import Dtype, check_choices, parse_config, run_main
from pipeline.core.layout import MEANINGS_DIR
from pipeline.steering.session import Session
from pipeline.steering.splice import SteerableSae, SteeringEntry


@dataclass
class InferenceConfig:
    model: str | None = None
    """Meta dir, HF dir or GGUF file; default: the SAE's model, else embedded SmolLM2-135M-Instruct."""
    prompt: list[str] = field(default_factory=list)
    """Text-completion prompts (batched together)."""
    chat: list[str] = field(default_factory=list)
    """User messages, each a one-turn chat (batched together)."""
    system: str | None = None
    """System message for --chat / --interactive."""
    interactive: bool = False
    """Multi-turn chat on stdin (/steer ENTRIES, /search TEXT, /reset, /quit)."""
    max_new_tokens: int = 64
    """Tokens to generate per prompt."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    dtype: Dtype = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."""
    stream: bool = True
    """Print tokens as they come (single prompt, no comparison)."""
    sae: str | None = None
    """SAE folder (sae.safetensors + cfg.json) to splice at its hook point."""
    meanings: str = str(MEANINGS_DIR)
    """Folder of latent meanings (interpretation output)."""
    steer: list[str] = field(default_factory=list)
    """Steering entries LATENT:MODE:STRENGTH, MODE in h_bias, clamp, add (needs --sae)."""
    steer_on: SpliceOn = "all"
    """Where steering applies: all, prompt, generated."""
    keep_error: bool = True
    """Add the SAE's error term back (unsteered = the clean model); --no-keep-error runs on the pure reconstruction."""
    compare: bool = True
    """With --steer, also generate unsteered, side by side."""
    inspect: int = 0
    """Show the N strongest latents (with meanings) on each generated token (needs --sae)."""
    search: str | None = None
    """List latents whose meaning contains these words, then exit (needs --sae)."""

    def __post_init__(self) -> None:
        check_choices(self)


DEMO_PROMPT = "The three primary colors are"
DEMO_CHAT = "In one sentence, what is a sparse autoencoder?"


def print_inspection(rows: list[dict]) -> None:
    for row in rows:
        latents = "; ".join(
            f"{x['latent']} ({x['activation']:.2f}) {x['meaning'][:40]}".rstrip() for x in row["latents"]
        )
        print(f"    {row['token']!r:>14}  {latents}")


def print_search(steerable: SteerableSae, query: str, limit: int = 20) -> list[dict]:
    hits = steerable.search(query, limit)
    if not steerable.meanings:
        print("no meanings for this SAE in the meanings folder; run the interpretation stage first")
    for h in hits:
        print(f"  {h['latent']:>6}  detection score {h.get('score')}  {h.get('meaning', '')}")
    if not hits:
        print(f"  no latent's meaning contains {query!r}")
    return hits


def main(cfg: InferenceConfig) -> dict:
    if (cfg.inspect or cfg.search) and not cfg.sae:
        raise PipelineInputError("--inspect / --search need --sae (the SAE whose latents to show)")
    check_splice_on(cfg.steer_on)
    session = Session.open(cfg.model, cfg.sae, cfg.meanings, cfg.device, cfg.dtype)
    if cfg.search is not None:
        return {"search": print_search(session.steerable, cfg.search)}
    entries = session.entries(cfg.steer)
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    steering = dict(keep_error=cfg.keep_error, compare=cfg.compare, steer_on=cfg.steer_on)
    if cfg.interactive:
        return {"chat": interactive_chat(session, cfg, entries, sampling, steering)}
    prompts, chats = cfg.prompt, cfg.chat
    if not prompts and not chats:
        prompts, chats = [DEMO_PROMPT], [DEMO_CHAT]
    results: dict[str, list] = {"text": [], "chat": [], "inspection": []}
    if entries:
        print(
            "steering: "
            + ", ".join(
                f"{e.latent}:{e.mode}:{e.strength:g} ({session.steerable.meaning(e.latent)[:50] or 'no meaning'})"
                for e in entries
            )
            + f" on {cfg.steer_on} tokens"
            + ("" if cfg.keep_error else ", pure SAE reconstruction")
        )

    def run(kind: str, labels: list[str], token_prompts: list[list[int]]):
        live = cfg.stream and len(token_prompts) == 1 and not (entries and cfg.compare)
        if live:
            print(f"\n[{kind}] {labels[0]}\n>>> ", end="", flush=True)
        on_text = (lambda b, d: print(d, end="", flush=True)) if live else None
        pairs = session.complete(token_prompts, entries, on_text=on_text, **steering, **sampling)
        if live:
            print()
        for label, (plain, steered) in zip(labels, pairs):
            if not live:
                print(f"\n[{kind}] {label}")
                if plain is not None:
                    print(f"  unsteered >>> {plain.text}\n  steered   >>> {steered.text}")
                else:
                    print(f">>> {steered.text}")
            if cfg.inspect:
                rows = session.inspect(steered, entries, cfg.steer_on, cfg.inspect)
                print("  latents on each generated token" + (" (steered)" if entries else "") + ":")
                print_inspection(rows)
                results["inspection"].append(rows)
        results[kind] = [steered for _, steered in pairs]
        results[f"{kind}_unsteered"] = [plain for plain, _ in pairs]

    if prompts:
        run("text", prompts, session.text_prompts(prompts))
    if chats:
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        run("chat", chats, [chat_tokens(session.loaded, system + [{"role": "user", "content": c}]) for c in chats])
    return results


def interactive_chat(
    session: Session, cfg: InferenceConfig, entries: list[SteeringEntry], sampling: dict, steering: dict
) -> list[dict]:
    """Read user turns from stdin until EOF or /quit; the dialog keeps the steered replies."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    dialog: list[dict] = list(system)
    print("chat: type a message; /steer LATENT:MODE:STRENGTH ... (no entries: off), /search WORDS, /reset, /quit")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            dialog = list(system)
            print("(dialog cleared)")
            continue
        try:
            if line.startswith("/steer"):
                entries = session.entries(line.split()[1:])
                print(f"(steering: {', '.join(f'{e.latent}:{e.mode}:{e.strength:g}' for e in entries) or 'off'})")
                continue
            if line.startswith("/search"):
                if session.steerable is None:
                    raise PipelineInputError("/search needs --sae")
                print_search(session.steerable, line[len("/search") :].strip())
                continue
            dialog.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            ((_, reply),) = session.complete(
                [chat_tokens(session.loaded, dialog)],
                entries,
                **{**steering, "compare": False},
                on_text=lambda b, d: print(d, end="", flush=True),
                **sampling,
            )
            print()
            dialog.append({"role": "assistant", "content": reply.text})
            if cfg.inspect:
                print_inspection(session.inspect(reply, entries, cfg.steer_on, cfg.inspect))
        except PipelineInputError as e:  # a bad command inside the chat is reported, the chat goes on
            print(f"error: {e}")
    return dialog


if __name__ == "__main__":
    run_main(main, parse_config(InferenceConfig, sys.argv[1:], __doc__))
