"""Batched, streaming generation with a KV cache: text and chat completion, greedy or nucleus sampling.

    gen = Generator(load_model(None))
    gen.text_completion(["The capital of France is"], temperature=0)
    gen.chat_completion([[{"role": "user", "content": "Hi"}]], splice={"resid_pre.20": my_fn})

Prompts of different lengths share one batch, left-padded: each row's RoPE positions start at 0 and
padded slots are masked out of attention, so a row's tokens do not depend on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence, get_args

import torch

from llama_3.chat import Dialog
from llama_3.checkpoints import LoadedModel
from llama_3.cpu_fast import apply_cpu_fast_paths
from llama_3.errors import PipelineInputError
from llama_3.hooks import HookRunner, SpliceSpec

SpliceOn = Literal["all", "prompt", "generated"]
SPLICE_ON: tuple[str, ...] = get_args(SpliceOn)


def check_splice_on(value: str) -> None:
    """Callers check before loading a model, so a typo fails at once."""
    if value not in SPLICE_ON:
        raise PipelineInputError(f"--steer-on {value!r}: expected one of {', '.join(SPLICE_ON)}")


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
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


class Generator:
    """Batched autoregressive generation with a KV cache; prompts may have different lengths."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        apply_cpu_fast_paths(self.model)  # a no-op off CPU

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
            raise PipelineInputError("generate: every prompt needs at least one token")
        if temperature < 0 or not 0 < top_p <= 1:
            raise PipelineInputError(
                f"generate: temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}"
            )
        check_splice_on(splice_on)
        B = len(prompts)
        if stop_tokens is None:
            stops = [self.tokenizer.stop_ids] * B
        elif isinstance(stop_tokens, set):
            stops = [stop_tokens] * B
        else:
            if len(stop_tokens) != B:
                raise PipelineInputError(f"generate: {len(stop_tokens)} stop-token sets for {B} prompts")
            stops = [set(s) for s in stop_tokens]
        ctx = self.model.args.max_seq_len
        lens = [len(p) for p in prompts]
        P = max(lens)
        if P >= ctx:
            raise PipelineInputError(f"prompt of {P} tokens does not fit the model's context of {ctx} tokens")
        total = min(P + max_new_tokens, ctx)
        device = self.device
        pad = torch.tensor([P - n for n in lens], device=device)  # [B]
        tokens = torch.full((B, P), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, P - len(p) :] = torch.tensor(list(p), dtype=torch.long, device=device)
        slots = torch.arange(total, device=device)
        key_valid = slots[None, :] >= pad[:, None] if int(pad.max()) > 0 else None  # [B, total]
        positions = (slots[None, :P] - pad[:, None]).clamp(min=0)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        hooks = HookRunner(self.model.args.n_layers, (), splice) if splice else None
        prefill_hooks = hooks if splice_on in ("all", "prompt") else None
        decode_hooks = hooks if splice_on in ("all", "generated") else None

        self.model.allocate_kv_cache(B, total)
        try:
            logits = self.model(
                tokens, 0, positions=positions, key_valid=key_valid, hooks=prefill_hooks, last_only=True
            )
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
                logits = self.model(
                    nxt[:, None],
                    cur,
                    positions=(cur - pad)[:, None],
                    key_valid=key_valid,
                    hooks=decode_hooks,
                    last_only=True,
                )
        finally:
            self.model.free_kv_cache()

    def stream_completions(
        self, prompts: Sequence[Sequence[int]], **kwargs
    ) -> Iterator[tuple[list[Completion], list[str]]]:
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
            yield (
                [
                    Completion(list(p), list(d.ids), d.emitted, "stop" if f else "length")
                    for p, d, f in zip(prompts, decoders, finished)
                ],
                deltas,
            )
        # Last, the full texts: what was held back as an incomplete UTF-8 sequence, decoded as it stands
        # and streamed too, so the deltas always add up to the final text.
        texts = [self.tokenizer.decode(d.ids) for d in decoders]
        yield (
            [
                Completion(list(p), list(d.ids), text, "stop" if f else "length")
                for p, d, text, f in zip(prompts, decoders, texts, finished)
            ],
            [text[len(d.emitted) :] for d, text in zip(decoders, texts)],
        )

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


def chat_tokens(loaded: LoadedModel, dialog: Dialog) -> list[int]:
    if loaded.chat_format is None:
        raise PipelineInputError(f"{loaded.path}: this checkpoint has no chat template; use text completion")
    return loaded.chat_format.encode_dialog(dialog)
