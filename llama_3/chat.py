"""Chat formatting: dialogs -> prompt token ids.

Llama 3 tokenizers get Meta's header format, built from token ids so user text can never inject
special tokens. Other checkpoints (SmolLM2's ChatML, ...) use their own Jinja chat template,
rendered in a sandbox with `add_generation_prompt=True`.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypedDict

from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_3.errors import PipelineInputError
from llama_3.tokenizer import Tokenizer


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


Dialog = Sequence[Message]


class ChatFormat(Protocol):
    name: str

    def encode_dialog(self, dialog: Dialog) -> list[int]:
        """Token ids of the dialog followed by the start of an assistant turn."""


def _check_dialog(dialog: Dialog) -> None:
    if not dialog:
        raise PipelineInputError("chat: empty dialog")
    for m in dialog:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PipelineInputError(f"chat: each message needs string 'role' and 'content', got {m!r}")


class Llama3ChatFormat:
    """<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>... (Meta's ChatFormat)."""

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.start_header = tokenizer.token_to_id("<|start_header_id|>")
        self.end_header = tokenizer.token_to_id("<|end_header_id|>")
        self.eot = tokenizer.token_to_id("<|eot_id|>")

    def _header(self, role: str) -> list[int]:
        return [
            self.start_header,
            *self.tok.encode(role, bos=False),
            self.end_header,
            *self.tok.encode("\n\n", bos=False),
        ]

    def encode_dialog(self, dialog: Dialog) -> list[int]:
        _check_dialog(dialog)
        ids = [self.tok.bos_id] if self.tok.bos_id is not None else []
        for m in dialog:
            ids += self._header(m["role"]) + self.tok.encode(m["content"].strip(), bos=False) + [self.eot]
        return ids + self._header("assistant")


class JinjaChatFormat:
    """The checkpoint's own chat template (tokenizer_config.json / GGUF tokenizer.chat_template)."""

    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, template: str, bos_token: str = "", eos_token: str = ""):

        def raise_exception(message: str):
            raise PipelineInputError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
        env.globals["raise_exception"] = raise_exception
        # Some templates (Llama 3.2's HF one, among others) print today's date.
        env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise PipelineInputError(f"chat template does not compile: {e}") from None
        self.tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, dialog: Dialog) -> str:
        _check_dialog(dialog)
        return self.template.render(
            messages=list(dialog), add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
        )

    def encode_dialog(self, dialog: Dialog) -> list[int]:
        # The template writes BOS itself when the model wants one.
        return self.tok.encode(self.render(dialog), bos=False, parse_special=True)


def make_chat_format(tokenizer: Tokenizer, template: str | None) -> ChatFormat | None:
    """Llama 3 header format if the vocabulary has its header tokens, else the Jinja template, else None."""
    if all(tokenizer.token_to_id(t) is not None for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        return Llama3ChatFormat(tokenizer)
    if template:
        piece = lambda i: tokenizer.id_to_piece(i) if i is not None else ""  # noqa: E731
        return JinjaChatFormat(tokenizer, template, piece(tokenizer.bos_id), piece(tokenizer.eos_id))
    return None
