"""Batched, streaming text and chat completion with the pure-PyTorch Llama 3 (optionally with splices).

Usage:
    # CPU, embedded default (SmolLM2-135M-Instruct): a demo text completion and chat completion
    python llama_3_inference.py
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
from llama_3.errors import LlamaInputError
from llama_3.hooks import HookRunner, SpliceSpec


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
    ) -> Iterator[list[int | None]]:
        """Yield, per step, each sequence's new token id (None once that sequence has stopped).

        Prompts are left-padded into one batch: padded cache slots are masked out and each row's
        RoPE positions start at 0, so a row's result does not depend on its batch mates.
        stop_tokens: one set for all rows, one set per row, or None for the tokenizer's stop ids.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LlamaInputError("generate: every prompt needs at least one token")
        if temperature < 0 or not 0 < top_p <= 1:
            raise LlamaInputError(f"generate: temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
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

        self.model.allocate_kv_cache(B, total)
        try:
            logits = self.model(tokens, 0, positions=positions, key_valid=key_valid, hooks=hooks, last_only=True)
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
                logits = self.model(nxt[:, None], cur, positions=(cur - pad)[:, None], key_valid=key_valid, hooks=hooks, last_only=True)
        finally:
            self.model.free_kv_cache()

    def generate(self, prompts: Sequence[Sequence[int]], on_text=None, **kwargs) -> list[Completion]:
        """Run `stream` to the end. on_text(row, delta) receives decoded text as it is produced."""
        decoders = [IncrementalDecoder(self.tokenizer) for _ in prompts]
        finished = [False] * len(prompts)
        for step in self.stream(prompts, **kwargs):
            for b, t in enumerate(step):
                if t is None:
                    finished[b] = True
                    continue
                delta = decoders[b].push(t)
                if on_text is not None and delta:
                    on_text(b, delta)
        return [
            Completion(list(p), d.ids, self.tokenizer.decode(d.ids), "stop" if f else "length")
            for p, d, f in zip(prompts, decoders, finished)
        ]

    def text_completion(self, prompts: Sequence[str], on_text=None, **kwargs) -> list[Completion]:
        return self.generate([self.tokenizer.encode(p) for p in prompts], on_text=on_text, **kwargs)

    def chat_completion(self, dialogs: Sequence[Dialog], on_text=None, **kwargs) -> list[Completion]:
        chat = self.loaded.chat_format
        if chat is None:
            raise LlamaInputError(f"{self.loaded.path}: this checkpoint has no chat template; use text completion")
        return self.generate([chat.encode_dialog(d) for d in dialogs], on_text=on_text, **kwargs)


@dataclass
class InferenceConfig:
    model: str | None = field(default=None, metadata={"help": "Meta dir, HF dir or GGUF file; default: embedded SmolLM2-135M-Instruct"})
    prompt: list[str] = field(default_factory=list, metadata={"help": "text-completion prompts (batched together)"})
    chat: list[str] = field(default_factory=list, metadata={"help": "user messages, each a one-turn chat (batched together)"})
    system: str | None = field(default=None, metadata={"help": "system message for --chat"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate per prompt"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"})
    stream: bool = field(default=True, metadata={"help": "print tokens as they come (single prompt)"})


DEMO_PROMPT = "The three primary colors are"
DEMO_CHAT = "In one sentence, what is a sparse autoencoder?"


def main(cfg: InferenceConfig) -> dict[str, list[Completion]]:
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype))
    gen = Generator(loaded)
    prompts, chats = cfg.prompt, cfg.chat
    if not prompts and not chats:
        prompts, chats = [DEMO_PROMPT], [DEMO_CHAT]
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    results: dict[str, list[Completion]] = {"text": [], "chat": []}

    def run(kind: str, inputs: list, fn):
        live = cfg.stream and len(inputs) == 1
        if live:
            print(f"\n[{kind}] {inputs[0]}\n>>> ", end="", flush=True)
        on_text = (lambda b, d: print(d, end="", flush=True)) if live else None
        out = fn(inputs, on_text=on_text, **kwargs)
        if live:
            print()
        else:
            for item, c in zip(inputs, out):
                print(f"\n[{kind}] {item}\n>>> {c.text}")
        results[kind] = out

    if prompts:
        run("text", prompts, gen.text_completion)
    if chats:
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        dialogs = [system + [{"role": "user", "content": c}] for c in chats]
        run("chat", chats, lambda _, **kw: gen.chat_completion(dialogs, **kw))
    return results


if __name__ == "__main__":
    run_main(main, parse_config(InferenceConfig, sys.argv[1:], __doc__))
