"""Manifests and atomic files: every stage output carries one `manifest.json`.

Schema (all stages): {"kind", "schema_version", "created", "config", "inputs", "counts",
"versions", "outcome", ...stage-specific keys}. A manifest is written last and atomically, so its presence
means the output is complete; partial work lives in files a reader never trusts.

Later stages never index a manifest dict themselves: each format's module has one typed reader
(`CaptureOutput.open`, `PreprocessedOutput.open`, ...) that reads its fields through `Fields`, so a
renamed or missing field is one error line naming the folder. Schema versions live in SCHEMA_VERSIONS.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from llama_3.errors import PipelineInputError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
SCHEMA_VERSIONS = {
    "sentences": 1,
    "activations": 2,  # 2: "tokenization" {add_bos, max_tokens} and "selection" {max_sentences}
    "preprocessed": 2,  # 2: "tokenization" carried from the capture, with exclude_first_positions
    "sae": 2,  # 2: the SAE's cfg.json carries add_bos and max_tokens
    "top_sentences": 1,
    "interpretation": 1,
    "steering_eval": 1,
    "pipeline": 1,
}
"""The version each kind's writer stamps and its reader requires: the one place a format change is declared."""
_VERSIONED_PACKAGES = ("torch", "numpy", "pyarrow", "nltk", "tokenizers", "tiktoken", "gguf", "safetensors", "datasets")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, else delete it.

    Readers therefore see either the old file, the complete new one, or nothing: never a partial file.
    Temp names start with "." and end in ".tmp".
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def make_manifest(kind: str, config: dict, inputs: dict, counts: dict, **extra: Any) -> dict:
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSIONS.get(kind, SCHEMA_VERSION),
        "outcome": "computed",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
        "counts": counts,
        "versions": package_versions(),
        **extra,
    }


def read_manifest(directory: Path, kind: str) -> dict:
    """Load and check `directory/manifest.json` of the expected kind; one-line errors otherwise."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        if Path(directory).is_dir():
            raise PipelineInputError(f"{path}: missing (is {directory} a finished {kind} output?)")
        raise PipelineInputError(f"{directory}: no such directory")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineInputError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(m, dict):
        raise PipelineInputError(f"{path}: not a manifest (expected a JSON object, found {type(m).__name__})")
    if m.get("kind") != kind:
        raise PipelineInputError(f"{path}: holds a {m.get('kind')!r} output, expected {kind!r}")
    expected = SCHEMA_VERSIONS.get(kind, SCHEMA_VERSION)
    if m.get("schema_version") != expected:
        raise PipelineInputError(
            f"{path}: schema_version {m.get('schema_version')}, this code reads {kind} outputs of version {expected}; "
            "re-run the stage that wrote it with --force"
        )
    return m


_REQUIRED = object()


class Fields:
    """Typed access to one read manifest: `Fields(dir, m).get("tokenization.add_bos", bool)`.

    A missing or mistyped field is one error line naming the folder, whichever stage reads it."""

    def __init__(self, directory: Path, manifest: dict, name: str = MANIFEST_NAME):
        self.directory, self.manifest, self.name = Path(directory), manifest, name

    def get(self, dotted: str, kind: type | tuple[type, ...] = object, default: Any = _REQUIRED) -> Any:
        node: Any = self.manifest
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                if default is not _REQUIRED:
                    return default
                raise PipelineInputError(
                    f"{self.directory}: its {self.name} has no field {dotted!r} (written by another version? "
                    "re-run the stage that wrote it with --force)"
                )
            node = node[key]
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            node = float(node)
        if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise PipelineInputError(
                f"{self.directory}: field {dotted!r} of its {self.name} is {type(node).__name__}, expected {names}"
            )
        return node


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file that is appended to (metrics.jsonl); [] when it does not exist.
    A line cut short by a kill is skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def fingerprint(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (configs, to tell whether an output matches a request)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
