"""Shared command-line plumbing for the stage scripts.

Each script declares a typed config dataclass whose fields carry their help text in
`field(metadata={"help": ...})`; `parse_config` turns it into argparse flags (`--max-new-tokens`),
and `run_main` prints a bad-input error as one line and exits nonzero instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from typing import Any, Callable, Sequence, TypeVar

import torch

from llama_3.errors import LlamaInputError

C = TypeVar("C")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    """Build an argparse parser from a config dataclass and parse argv into an instance."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = hints[f.name]
        origin = typing.get_origin(tp)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if origin in (typing.Union, types.UnionType) and len(args) == 1:
            tp, origin, args = args[0], typing.get_origin(args[0]), typing.get_args(args[0])
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif origin is list:
            parser.add_argument(_flag(f.name), nargs="*", type=args[0] if args else str, default=default, help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=tp if tp in (int, float, str) else str, default=default,
                                help=f"{help_text} (default: {default})")
    ns = parser.parse_args(argv)
    return cls(**vars(ns))


def run_main(main: Callable[[Any], Any], cfg: Any) -> None:
    """Run main(cfg); bad input becomes one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(cfg)
    except LlamaInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda (this rank's device under torchrun) if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LlamaInputError(f"--device {name!r}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlamaInputError(f"--device {name}: CUDA is not available on this machine")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype | None:
    """'auto' -> None (the loader picks bf16 on CUDA, fp32 on CPU)."""
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise LlamaInputError(f"--dtype {name!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]
