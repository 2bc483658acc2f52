"""Configs and the command line: one convention for every config (the SAE's and each stage's).

A config is a dataclass with one line and one docstring per field (sparsify's style):

    @dataclass
    class CaptureConfig:
        max_sentences: int = 0
        '''Capture only the first N sentences (0: all).'''
        out: Runtime[str] = "runs/activations"
        '''Output folder.'''

        def __post_init__(self) -> None:  # checks: a config built in code is checked as the command line is
            check_choices(self)

`parse_config` turns it into argparse flags (`--max-sentences`, help from the docstring's first paragraph);
`Runtime[T]` marks a field that says how to run, not what to compute (output paths, devices, workers,
logging, --force): it is left out of the output's fingerprint (`config_request`). `run_main` prints a
bad-input error as one line and exits nonzero instead of a traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import logging
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence, TypeVar

import torch

from llama_3.errors import PipelineInputError

C = TypeVar("C")
T = TypeVar("T")
_RUNTIME = "runtime: not in the output's fingerprint"
Runtime = Annotated[T, _RUNTIME]
"""A config field that does not change the output (where it goes, which device, --force): `out: Runtime[str]`."""
Dtype = typing.Literal["auto", "float32", "bfloat16", "float16"]
"""A model's compute dtype flag; auto: bf16 on CUDA (and where a stage says so), fp32 on CPU."""
StorageDtype = typing.Literal["bfloat16", "float16", "float32"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """A bad flag is bad input like any other: one line, exit status 2 (no usage dump)."""
        choice = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)  # a choice error names its flag already
        print(f"error: {choice if choice != message else message + ' (--help lists the flags)'}", file=sys.stderr)
        sys.exit(2)


def literal_choices(tp: Any) -> tuple | None:
    """The values of a `Literal[...]` type, else None."""
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def _choice_error(flag: str, value: Any, choices: tuple) -> str:
    return f"{flag} {value!r}: expected one of {', '.join(map(str, choices))}"


def _choice(flag: str, choices: tuple) -> Callable[[str], str]:
    def convert(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(_choice_error(flag, value, choices))
        return value

    return convert


def check_choices(cfg: Any) -> None:
    """Every `Literal` field of a config dataclass (or list of them) holds one of its values; configs call
    this in `__post_init__`, so a config built in code is checked as the command line is."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        choices = literal_choices(tp)
        if choices is not None and value not in choices:
            raise PipelineInputError(_choice_error(_flag(f.name), value, choices))
        if typing.get_origin(tp) is list and (item_choices := literal_choices(typing.get_args(tp)[0])) is not None:
            for item in value:
                if item not in item_choices:
                    raise PipelineInputError(_choice_error(_flag(f.name), item, item_choices))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of a config class and its bases, read from their source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        except (OSError, TypeError):
            continue
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_help(cls: type, name: str) -> str:
    """The flag's help: the field docstring's first paragraph, on one line."""
    return " ".join(field_docs(cls).get(name, "").split("\n\n")[0].split())


def runtime_fields(cls: type) -> set[str]:
    """The fields declared `Runtime[...]`: left out of the fingerprint."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name for name, tp in hints.items() if _RUNTIME in getattr(tp, "__metadata__", ())}


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    """Build an argparse parser from a config dataclass and parse argv into an instance.

    `Literal` fields (and lists of them) become argparse choices; a bad value is a one-line error.
    """
    parser = _OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = field_help(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = hints[f.name]
        origin = typing.get_origin(tp)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if origin in (typing.Union, types.UnionType) and len(args) == 1:
            tp, origin, args = args[0], typing.get_origin(args[0]), typing.get_args(args[0])
        choices = literal_choices(tp)
        item_choices = literal_choices(args[0]) if origin is list and args else None
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif choices is not None:
            flag = _flag(f.name)
            parser.add_argument(
                flag,
                type=_choice(flag, choices),
                choices=choices,
                default=default,
                help=f"{help_text} (default: {default})",
            )
        elif item_choices is not None:
            flag = _flag(f.name)
            parser.add_argument(
                flag, nargs="*", type=_choice(flag, item_choices), choices=item_choices, default=default, help=help_text
            )
        elif origin is list:
            parser.add_argument(
                _flag(f.name), nargs="*", type=args[0] if args else str, default=default, help=help_text
            )
        else:
            parser.add_argument(
                _flag(f.name),
                type=tp if tp in (int, float, str) else str,
                default=default,
                help=f"{help_text} (default: {default})",
            )
    ns = parser.parse_args(argv)
    return cls(**vars(ns))


_created_folders: list[Path] = []


def note_created_folder(path: Path) -> None:
    """An output folder this command is about to create (pipeline/core/output_folder.py)."""
    _created_folders.append(Path(path))


def remove_empty_created_folders() -> None:
    """A failed command leaves no empty output folder behind: the folders it created and never wrote into
    go (deepest first; a folder holding anything stays)."""
    for path in sorted(_created_folders, key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:  # not empty, or gone already
            pass
    _created_folders.clear()


def run_main(main: Callable[[Any], Any], cfg: Any) -> None:
    """Run main(cfg); bad input becomes one line on stderr and exit status 2. A failure of any kind removes
    the output folders the command created and left empty."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(cfg)
    except PipelineInputError as e:
        remove_empty_created_folders()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        remove_empty_created_folders()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        remove_empty_created_folders()
        raise


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda (this rank's device under torchrun) if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineInputError(f"--device {name!r}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineInputError(f"--device {name}: CUDA is not available on this machine")
    return device


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str) -> torch.dtype | None:
    """'auto' -> None (the loader picks bf16 on CUDA, fp32 on CPU)."""
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise PipelineInputError(f"--dtype {name!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]
