"""A model, optionally with an SAE and steering entries: what the terminal CLI, the Gradio page and the
steering evaluation drive. Steered and unsteered rows run in one batch (pipeline/steering/splice.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from llama_3.checkpoints import LoadedModel, load_model
from llama_3.cpu_features import warn_if_emulated
from llama_3.errors import PipelineInputError
from llama_3.generation import Completion, Generator
from pipeline.core.cli import resolve_device, resolve_dtype
from pipeline.steering.splice import (
    SteerableSae,
    SteeringEntry,
    check_entries,
    inspect_tokens,
    open_steering,
    steering_batch,
)


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

    def text_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain-text prompts as token ids: BOS first when the SAE's training capture prepended one (the
        sequences it was trained on), else the tokenizer's default; chat templates bring their own. Either
        way the sink at position 0 (BOS or the first text token) is a position the splice skips."""
        bos = True if self.steerable is not None and self.steerable.sae.cfg.add_bos else None
        return [self.loaded.tokenizer.encode(t, bos=bos) for t in texts]

    def entries(self, texts: Sequence[str]) -> list[SteeringEntry]:
        entries = [SteeringEntry.parse(t) for t in texts]
        if entries and self.steerable is None:
            raise PipelineInputError("--steer needs --sae (the SAE whose latents to steer)")
        if entries:
            check_entries(self.steerable.sae, entries)
        return entries

    def _batch(
        self, prompts: list[list[int]], entries: list[SteeringEntry], keep_error: bool, compare: bool, steer_on: str
    ) -> tuple[list[list[int]], dict, bool]:
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

    def complete(
        self,
        prompts: list[list[int]],
        entries: list[SteeringEntry],
        *,
        keep_error: bool = True,
        compare: bool = True,
        steer_on: str = "all",
        on_text=None,
        **sampling,
    ) -> list[tuple[Completion | None, Completion]]:
        """[(unsteered or None, steered-or-plain)] per prompt."""
        batch, kwargs, compared = self._batch(prompts, entries, keep_error, compare, steer_on)
        return self._pairs(self.gen.generate(batch, on_text=on_text, **kwargs, **sampling), len(prompts), compared)

    def stream(
        self,
        prompts: list[list[int]],
        entries: list[SteeringEntry],
        *,
        keep_error: bool = True,
        compare: bool = True,
        steer_on: str = "all",
        **sampling,
    ) -> Iterator[list[tuple[Completion | None, Completion]]]:
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
        return [
            {
                "token": self.loaded.tokenizer.decode([t]),
                "latents": [
                    {"latent": i, "activation": round(a, 3), "meaning": self.steerable.meaning(i)}
                    for i, a in per_position[start + j]
                ],
            }
            for j, t in enumerate(completion.tokens)
        ]
