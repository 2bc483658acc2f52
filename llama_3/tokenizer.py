"""Tokenizers for the three checkpoint formats, behind one interface.

- Meta `tokenizer.model`: tiktoken BPE ranks + Llama 3's 256 special tokens (Meta's own code path).
- Hugging Face `tokenizer.json`: loaded by `tokenizers`.
- GGUF vocabulary and merges: rebuilt as a `tokenizers` byte-level BPE with the pre-tokenizer that
  llama.cpp uses for the file's `tokenizer.ggml.pre` type.

Special-token strings inside user text are tokenized as plain text unless `parse_special=True`
(chat templates render special tokens as text and need them parsed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llama_3.errors import PipelineInputError

# Meta's Llama 3 pre-tokenizer regex (also in Llama 3's tokenizer.json and llama.cpp's "llama-bpe").
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL = 256
# Llama 3.1/3.2 special tokens, in id order after the BPE ranks (llama-models' tokenizer.py).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
# Tokens that end a generation whenever the vocabulary has them.
END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "</s>")


class Tokenizer:
    """Common interface: encode/decode, BOS/EOS, stop tokens, per-id token strings."""

    def __init__(self, backend: "_Backend", bos_id: int | None, eos_id: int | None, add_bos_default: bool, source: str):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos_default = add_bos_default
        self.source = source
        self.stop_ids: set[int] = {i for i in (self.token_to_id(t) for t in END_TOKENS) if i is not None}
        if eos_id is not None:
            self.stop_ids.add(eos_id)
        # Padding only fills slots that are masked out; any valid id works.
        self.pad_id = eos_id if eos_id is not None else 0

    @property
    def n_words(self) -> int:
        """Number of token ids (BPE ranks + special tokens)."""
        return self.backend.n_words

    def encode(self, text: str, bos: bool | None = None, parse_special: bool = False) -> list[int]:
        ids = self.backend.encode(text, parse_special)
        if (self.add_bos_default if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool | None = None) -> list[list[int]]:
        """Encode many texts at once (parallel in the backends); special-token strings stay text."""
        batch = self.backend.encode_batch(list(texts))
        if (self.add_bos_default if bos is None else bos) and self.bos_id is not None:
            batch = [[self.bos_id] + ids for ids in batch]
        return batch

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_piece(self, i: int) -> str:
        """The text of one token (decoded bytes; partial UTF-8 shows as U+FFFD)."""
        return self.backend.decode([i])

    def fingerprint(self) -> str:
        """sha256 of the vocabulary (id -> bytes), to tell whether two tokenizers agree."""
        return self.backend.fingerprint()


class _Backend:
    n_words: int

    def encode(self, text: str, parse_special: bool) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def fingerprint(self) -> str: ...


class TiktokenBackend(_Backend):
    """Meta's Llama 3 tokenizer: tiktoken ranks file + 256 special tokens appended after them."""

    def __init__(self, model_path: Path):

        try:
            ranks = load_tiktoken_bpe(str(model_path))
        except FileNotFoundError:
            raise PipelineInputError(f"{model_path}: file not found") from None
        except Exception as e:  # tiktoken raises bare ValueError/binascii errors on bad lines
            raise PipelineInputError(f"{model_path}: not a tiktoken BPE ranks file ({e})") from None
        n_base = len(ranks)
        names = LLAMA3_SPECIAL_TOKENS + [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(LLAMA3_NUM_RESERVED_SPECIAL - len(LLAMA3_SPECIAL_TOKENS))
        ]
        self.special = {t: n_base + i for i, t in enumerate(names)}
        self.enc = tiktoken.Encoding(
            name=model_path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special
        )
        self.n_words = n_base + len(self.special)
        self._ranks = ranks

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if parse_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode(text, disallowed_special=())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        return self._ranks.get(token.encode("utf-8"))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for b, r in sorted(self._ranks.items(), key=lambda kv: kv[1]):
            h.update(r.to_bytes(4, "little") + b + b"\0")
        for t, i in sorted(self.special.items(), key=lambda kv: kv[1]):
            h.update(i.to_bytes(4, "little") + t.encode() + b"\0")
        return h.hexdigest()


class HFBackend(_Backend):
    """A `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from GGUF)."""

    def __init__(self, tok):
        self.tok = tok
        self.n_words = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        # encode_special_tokens=True makes added special tokens plain text.
        self.tok.encode_special_tokens = not parse_special
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.tok.encode_special_tokens = True
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def fingerprint(self) -> str:
        vocab = self.tok.get_vocab(with_added_tokens=True)
        h = hashlib.sha256()
        for t, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            h.update(i.to_bytes(4, "little") + t.encode() + b"\0")
        return h.hexdigest()


def load_meta_tokenizer(path: Path) -> Tokenizer:
    backend = TiktokenBackend(path)
    return Tokenizer(
        backend,
        bos_id=backend.special["<|begin_of_text|>"],
        eos_id=backend.special["<|end_of_text|>"],
        add_bos_default=True,
        source=str(path),
    )


def load_hf_tokenizer(directory: Path) -> tuple[Tokenizer, dict]:
    """Load tokenizer.json (+ tokenizer_config.json if present). Returns (tokenizer, tokenizer_config)."""

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise PipelineInputError(f"{path}: file not found (a Hugging Face checkpoint needs tokenizer.json)")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise PipelineInputError(f"{path}: cannot be read by `tokenizers` ({str(e).splitlines()[0]})") from None
    cfg_path = directory / "tokenizer_config.json"
    cfg: dict = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise PipelineInputError(f"{cfg_path}: not valid JSON ({e.msg})") from None

    def special_id(key: str) -> int | None:
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return tok.token_to_id(v) if isinstance(v, str) else None

    bos_id = special_id("bos_token")
    eos_id = special_id("eos_token")
    # Whether the checkpoint prepends BOS: tokenizer_config says so, or the post-processor does it.
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        add_bos = len(full) > len(plain) and full[0] != (plain[0] if plain else None)
        if add_bos and bos_id is None:
            bos_id = full[0]
    return Tokenizer(HFBackend(tok), bos_id, eos_id, bool(add_bos), str(path)), cfg


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_UNICODE = _bytes_to_unicode()

# GGUF token types (llama.cpp's llama_token_type).
GGUF_TOKEN_NORMAL, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 3, 4


def build_gguf_tokenizer(meta: dict, source: str) -> Tokenizer:
    """Rebuild a byte-level BPE from GGUF's tokenizer.ggml.* fields, matching llama.cpp's pre-tokenizer."""

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise PipelineInputError(
            f"{source}: tokenizer.ggml.model={model!r} is not supported (Llama 3 uses byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges_raw: list[str] = meta.get("tokenizer.ggml.merges", [])
    types: list[int] = meta.get("tokenizer.ggml.token_type", [GGUF_TOKEN_NORMAL] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre", "default")

    if pre in ("llama-bpe", "llama3", "llama-v3"):
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        ignore_merges = True  # llama.cpp and HF both take whole-word vocab hits first for Llama 3
    elif pre == "smollm":
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        ignore_merges = False
    elif pre in ("default", "gpt2"):
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        ignore_merges = False
    else:
        raise PipelineInputError(
            f"{source}: tokenizer.ggml.pre={pre!r} is not supported (known: llama-bpe, smollm, gpt2)"
        )

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise PipelineInputError(f"{source}: tokenizer.ggml.tokens has duplicate entries")
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise PipelineInputError(f"{source}: malformed merge {m!r}")
        merges.append((a, b))
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, t in enumerate(types) if t in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)]
    # Re-adding existing vocabulary entries keeps their ids and makes them atomic.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def opt_id(key: str) -> int | None:
        v = meta.get(key)
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    bos_id, eos_id = opt_id("tokenizer.ggml.bos_token_id"), opt_id("tokenizer.ggml.eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = pre in ("llama-bpe", "llama3", "llama-v3")  # llama.cpp's default for Llama 3 vocabularies
    return Tokenizer(HFBackend(tok), bos_id, eos_id, bool(add_bos), source)
