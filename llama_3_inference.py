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

Library:
    gen = Generator(load_model(None))
    gen.text_completion(["The capital of France is"], temperature=0)
    gen.chat_completion([[{"role": "user", "content": "Hi"}]], splice={"resid_pre.20": my_fn})
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from llama_3.checkpoints import LoadedModel, load_model
from llama_3.chat import Dialog
from llama_3.cli import parse_config, resolve_device, resolve_dtype, run_main
from llama_3.cpu_features import warn_if_emulated
from llama_3.errors import LlamaInputError
from llama_3.hooks import HookRunner, SpliceSpec
from pipeline.steering import SteerableSae, SteeringEntry, check_entries, inspect_tokens, open_steering, steering_batch


SPLICE_ON = ("all", "prompt", "generated")


def check_splice_on(value: str) -> None:
    """Callers check before loading a model, so a typo fails at once."""
    if value not in SPLICE_ON:
        raise LlamaInputError(f"--steer-on {value!r}: expected one of {', '.join(SPLICE_ON)}")


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]
    """Generated ids, without the stop token."""
    text: str
    finish_reason: str
    """"stop" (a stop token) or "length" (max_new_tokens or the context ran out)."""


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling: probs [B, V] -> ids [B]; keeps the smallest prefix of sorted probs whose mass reaches p."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


class Generator:
    """Batched autoregressive generation with a KV cache; prompts may have different lengths."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        if self.device.type == "cpu":
            self.model.pack_for_cpu_inference()

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @torch.inference_mode()
    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.6,
        top_p: float = 0.9,
        seed: int | None = None,
        stop_tokens: Sequence[set[int]] | set[int] | None = None,
        splice: SpliceSpec | None = None,
        splice_on: str = "all",
    ) -> Iterator[list[int | None]]:
        """Yield, per step, each sequence's new token id (None once that sequence has stopped).

        Prompts are left-padded into one batch: padded cache slots are masked out and each row's
        RoPE positions start at 0, so a row's result does not depend on its batch mates.
        stop_tokens: one set for all rows, one set per row, or None for the tokenizer's stop ids.
        splice_on: "all", "prompt" (the prefill only) or "generated" (only the generated tokens fed
            back; the first new token is then predicted by the unspliced prompt).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LlamaInputError("generate: every prompt needs at least one token")
        if temperature < 0 or not 0 < top_p <= 1:
            raise LlamaInputError(f"generate: temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        check_splice_on(splice_on)
        B = len(prompts)
        if stop_tokens is None:
            stops = [self.tokenizer.stop_ids] * B
        elif isinstance(stop_tokens, set):
            stops = [stop_tokens] * B
        else:
            if len(stop_tokens) != B:
                raise LlamaInputError(f"generate: {len(stop_tokens)} stop-token sets for {B} prompts")
            stops = [set(s) for s in stop_tokens]
        ctx = self.model.args.max_seq_len
        lens = [len(p) for p in prompts]
        P = max(lens)
        if P >= ctx:
            raise LlamaInputError(f"prompt of {P} tokens does not fit the model's context of {ctx} tokens")
        total = min(P + max_new_tokens, ctx)
        device = self.device
        pad = torch.tensor([P - n for n in lens], device=device)  # [B]
        tokens = torch.full((B, P), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, P - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        slots = torch.arange(total, device=device)
        key_valid = slots[None, :] >= pad[:, None] if int(pad.max()) > 0 else None  # [B, total]
        positions = (slots[None, :P] - pad[:, None]).clamp(min=0)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        hooks = HookRunner(self.model.args.n_layers, (), splice) if splice else None
        prefill_hooks = hooks if splice_on in ("all", "prompt") else None
        decode_hooks = hooks if splice_on in ("all", "generated") else None

        self.model.allocate_kv_cache(B, total)
        try:
            logits = self.model(tokens, 0, positions=positions, key_valid=key_valid, hooks=prefill_hooks, last_only=True)
            done = [False] * B
            for cur in range(P, total):
                last = logits[:, -1].float()  # sample in fp32 whatever the model dtype
                if temperature > 0:
                    nxt = sample_top_p(torch.softmax(last / temperature, dim=-1), top_p, gen)
                else:
                    nxt = last.argmax(dim=-1)
                # One device->host copy per step; stop checks are set lookups on the host.
                out: list[int | None] = []
                for b, t in enumerate(nxt.tolist()):
                    done[b] = done[b] or t in stops[b]
                    out.append(None if done[b] else t)
                yield out
                if all(done) or cur + 1 >= total:
                    return
                logits = self.model(nxt[:, None], cur, positions=(cur - pad)[:, None], key_valid=key_valid, hooks=decode_hooks,
                                    last_only=True)
        finally:
            self.model.free_kv_cache()

    def stream_completions(self, prompts: Sequence[Sequence[int]], **kwargs) -> Iterator[tuple[list[Completion], list[str]]]:
        """Run `stream`, yielding after every step (the completions so far, each row's new text); the
        last item holds the final texts."""
        decoders = [IncrementalDecoder(self.tokenizer) for _ in prompts]
        finished = [False] * len(prompts)
        for step in self.stream(prompts, **kwargs):
            deltas = [""] * len(prompts)
            for b, t in enumerate(step):
                if t is None:
                    finished[b] = True
                else:
                    deltas[b] = decoders[b].push(t)
            yield [Completion(list(p), list(d.ids), d.emitted, "stop" if f else "length")
                   for p, d, f in zip(prompts, decoders, finished)], deltas
        # Last, the full texts: what was held back as an incomplete UTF-8 sequence, decoded as it stands
        # and streamed too, so the deltas always add up to the final text.
        texts = [self.tokenizer.decode(d.ids) for d in decoders]
        yield [Completion(list(p), list(d.ids), text, "stop" if f else "length")
               for p, d, text, f in zip(prompts, decoders, texts, finished)], \
            [text[len(d.emitted):] for d, text in zip(decoders, texts)]

    def generate(self, prompts: Sequence[Sequence[int]], on_text=None, **kwargs) -> list[Completion]:
        """Run `stream` to the end. on_text(row, delta) receives decoded text as it is produced."""
        completions: list[Completion] = []
        for completions, deltas in self.stream_completions(prompts, **kwargs):
            if on_text is not None:
                for b, delta in enumerate(deltas):
                    if delta:
                        on_text(b, delta)
        return completions

    def text_completion(self, prompts: Sequence[str], on_text=None, **kwargs) -> list[Completion]:
        return self.generate([self.tokenizer.encode(p) for p in prompts], on_text=on_text, **kwargs)

    def chat_completion(self, dialogs: Sequence[Dialog], on_text=None, **kwargs) -> list[Completion]:
        return self.generate([chat_tokens(self.loaded, d) for d in dialogs], on_text=on_text, **kwargs)


@dataclass
class InferenceConfig:
    model: str | None = field(default=None, metadata={"help": "Meta dir, HF dir or GGUF file; default: the SAE's model, else embedded SmolLM2-135M-Instruct"})
    prompt: list[str] = field(default_factory=list, metadata={"help": "text-completion prompts (batched together)"})
    chat: list[str] = field(default_factory=list, metadata={"help": "user messages, each a one-turn chat (batched together)"})
    system: str | None = field(default=None, metadata={"help": "system message for --chat / --interactive"})
    interactive: bool = field(default=False, metadata={"help": "multi-turn chat on stdin (/steer ENTRIES, /search TEXT, /reset, /quit)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate per prompt"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"})
    stream: bool = field(default=True, metadata={"help": "print tokens as they come (single prompt, no comparison)"})
    sae: str | None = field(default=None, metadata={"help": "SAE folder (sae.safetensors + cfg.json) to splice at its hook point"})
    meanings: str = field(default="latent_index_meaning", metadata={"help": "folder of latent meanings (interpretation output)"})
    steer: list[str] = field(default_factory=list, metadata={"help": "steering entries LATENT:MODE:STRENGTH, MODE in h_bias, clamp, add (needs --sae)"})
    steer_on: str = field(default="all", metadata={"help": "where steering applies: all, prompt, generated"})
    keep_error: bool = field(default=True, metadata={"help": "add the SAE's error term back (unsteered = the clean model); --no-keep-error runs on the pure reconstruction"})
    compare: bool = field(default=True, metadata={"help": "with --steer, also generate unsteered, side by side"})
    inspect: int = field(default=0, metadata={"help": "show the N strongest latents (with meanings) on each generated token (needs --sae)"})
    search: str | None = field(default=None, metadata={"help": "list latents whose meaning contains these words, then exit (needs --sae)"})


DEMO_PROMPT = "The three primary colors are"
DEMO_CHAT = "In one sentence, what is a sparse autoencoder?"


@dataclass
class Session:
    """A model, optionally with an SAE and steering entries: what the CLI and the Gradio page drive."""

    loaded: LoadedModel
    gen: Generator
    steerable: "SteerableSae | None" = None

    @classmethod
    def open(cls, model: str | None, sae: str | None, meanings: str, device: str, dtype: str) -> "Session":
        dev = resolve_device(device)
        warn_if_emulated(resolve_dtype(dtype), dev, f"--dtype {dtype}")
        if sae is None:
            loaded = load_model(model, device=dev, dtype=resolve_dtype(dtype))
            return cls(loaded, Generator(loaded))
        loaded, steerable = open_steering(sae, model, meanings, dev, resolve_dtype(dtype))
        return cls(loaded, Generator(loaded), steerable)

    def entries(self, texts: Sequence[str]) -> list[SteeringEntry]:
        entries = [SteeringEntry.parse(t) for t in texts]
        if entries and self.steerable is None:
            raise LlamaInputError("--steer needs --sae (the SAE whose latents to steer)")
        if entries:
            check_entries(self.steerable.sae, entries)
        return entries

    def _batch(self, prompts: list[list[int]], entries: list[SteeringEntry], keep_error: bool, compare: bool,
               steer_on: str) -> tuple[list[list[int]], dict, bool]:
        """(batch rows, generation kwargs, compared?): with an SAE and no entries the splice still runs
        (exactly the clean model with the error term, the plain reconstruction without)."""
        if self.steerable is None:
            return prompts, {}, False
        compare = compare and bool(entries)
        batch, splice = steering_batch(self.steerable.sae, prompts, entries, keep_error, compare)
        return batch, {"splice": {self.steerable.hook_point: splice}, "splice_on": steer_on}, compare

    @staticmethod
    def _pairs(out: list[Completion], n: int, compared: bool) -> list[tuple[Completion | None, Completion]]:
        return list(zip(out[:n], out[n:])) if compared else [(None, c) for c in out]

    def complete(self, prompts: list[list[int]], entries: list[SteeringEntry], *, keep_error: bool = True,
                 compare: bool = True, steer_on: str = "all", on_text=None, **sampling) -> list[tuple[Completion | None, Completion]]:
        """[(unsteered or None, steered-or-plain)] per prompt."""
        batch, kwargs, compared = self._batch(prompts, entries, keep_error, compare, steer_on)
        return self._pairs(self.gen.generate(batch, on_text=on_text, **kwargs, **sampling), len(prompts), compared)

    def stream(self, prompts: list[list[int]], entries: list[SteeringEntry], *, keep_error: bool = True,
               compare: bool = True, steer_on: str = "all", **sampling) -> Iterator[list[tuple[Completion | None, Completion]]]:
        """As `complete`, yielding the completions so far after every generated token."""
        batch, kwargs, compared = self._batch(prompts, entries, keep_error, compare, steer_on)
        for out, _ in self.gen.stream_completions(batch, **kwargs, **sampling):
            yield self._pairs(out, len(prompts), compared)

    def inspect(self, completion: Completion, entries: list[SteeringEntry], steer_on: str, top: int) -> list[dict]:
        """Per generated token: its text and the `top` latents active on it, with meanings."""
        tokens = completion.prompt_tokens + completion.tokens
        # where the steering acted; with "prompt" the generated tokens saw the plain SAE
        steer_from = {"all": 0, "generated": len(completion.prompt_tokens), "prompt": len(tokens)}[steer_on]
        per_position = inspect_tokens(self.loaded.model, self.steerable.sae, tokens, entries, steer_from, top)
        start = len(completion.prompt_tokens)
        return [{"token": self.loaded.tokenizer.decode([t]), "latents": [
                    {"latent": i, "activation": round(a, 3), "meaning": self.steerable.meaning(i)} for i, a in per_position[start + j]]}
                for j, t in enumerate(completion.tokens)]


def print_inspection(rows: list[dict]) -> None:
    for row in rows:
        latents = "; ".join(f"{x['latent']} ({x['activation']:.2f}) {x['meaning'][:40]}".rstrip() for x in row["latents"])
        print(f"    {row['token']!r:>14}  {latents}")


def print_search(steerable: SteerableSae, query: str, limit: int = 20) -> list[dict]:
    hits = steerable.search(query, limit)
    if not steerable.meanings:
        print("no meanings for this SAE in the meanings folder; run the interpretation stage first")
    for h in hits:
        print(f"  {h['latent']:>6}  certainty {float(h.get('certainty') or 0):.2f}  score {h.get('score')}  {h.get('meaning', '')}")
    if not hits:
        print(f"  no latent's meaning contains {query!r}")
    return hits


def main(cfg: InferenceConfig) -> dict:
    if (cfg.inspect or cfg.search) and not cfg.sae:
        raise LlamaInputError("--inspect / --search need --sae (the SAE whose latents to show)")
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
        print("steering: " + ", ".join(f"{e.latent}:{e.mode}:{e.strength:g} ({session.steerable.meaning(e.latent)[:50] or 'no meaning'})"
                                      for e in entries) + f" on {cfg.steer_on} tokens" + ("" if cfg.keep_error else ", pure SAE reconstruction"))

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
        run("text", prompts, [session.loaded.tokenizer.encode(p) for p in prompts])
    if chats:
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        run("chat", chats, [chat_tokens(session.loaded, system + [{"role": "user", "content": c}]) for c in chats])
    return results


def chat_tokens(loaded: LoadedModel, dialog: Dialog) -> list[int]:
    if loaded.chat_format is None:
        raise LlamaInputError(f"{loaded.path}: this checkpoint has no chat template; use text completion")
    return loaded.chat_format.encode_dialog(dialog)


def interactive_chat(session: Session, cfg: InferenceConfig, entries: list[SteeringEntry], sampling: dict, steering: dict) -> list[dict]:
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
                    raise LlamaInputError("/search needs --sae")
                print_search(session.steerable, line[len("/search"):].strip())
                continue
            dialog.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            (_, reply), = session.complete([chat_tokens(session.loaded, dialog)], entries, **{**steering, "compare": False},
                                           on_text=lambda b, d: print(d, end="", flush=True), **sampling)
            print()
            dialog.append({"role": "assistant", "content": reply.text})
            if cfg.inspect:
                print_inspection(session.inspect(reply, entries, cfg.steer_on, cfg.inspect))
        except LlamaInputError as e:  # a bad command inside the chat is reported, the chat goes on
            print(f"error: {e}")
    return dialog


if __name__ == "__main__":
    run_main(main, parse_config(InferenceConfig, sys.argv[1:], __doc__))
