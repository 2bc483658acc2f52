"""Manifests and atomic files: every stage output carries one `manifest.json`.

Schema (all stages): {"kind", "schema_version", "created", "config", "inputs", "counts",
"versions", ...stage-specific keys}. A manifest is written last and atomically, so its presence
means the output is complete; partial work lives in files a reader never trusts.
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
        "schema_version": SCHEMA_VERSION,
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
    if m.get("schema_version") != SCHEMA_VERSION:
        raise PipelineInputError(f"{path}: schema_version {m.get('schema_version')} is not {SCHEMA_VERSION}")
    return m


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


def finished_manifest(directory: Path, request: str, *files: str) -> dict | None:
    """The manifest of a finished output made for this request fingerprint (and holding `files`),
    or None: what a stage checks before reusing its output instead of recomputing it."""
    path = Path(directory) / MANIFEST_NAME
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(m, dict)
        or m.get("fingerprint") != request
        or not all((Path(directory) / f).is_file() for f in files)
    ):
        return None
    return m


def fingerprint(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (configs, to tell whether an output matches a request)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
