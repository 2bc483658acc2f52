"""One lifecycle for every stage's output folder: fresh, resume, reuse, refuse, or --force.

A stage describes its folder once (`OutputFolder`: which names are its own, which files hold a
partial run's fingerprint) and asks `prepare(request, force)` before doing any work:

    reuse    a finished output (manifest.json, its files present) made for this very request: nothing
             to compute; its manifest's "outcome" is set to "reused" for run_pipeline.py to read
    resume   partial work of this request (progress files with its fingerprint): keep it
    fresh    nothing of ours, or --force: start from an empty folder (our files removed)
    refuse   an output or partial run of another request, without --force: one error line (or, for
             outputs declared `replace_other`, fresh)

The request is a fingerprint of what decides the output: the config fields (all but those declared
`field(metadata={"fingerprint": False})`, see `config_request`) plus what the stage resolved from its
inputs (their fingerprints, the model's identity). Under torchrun every rank calls prepare; the main
rank alone creates, wipes and records, between barriers, so all ranks see the same folder.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal

from llama_3.errors import PipelineInputError
from pipeline.core.cli import note_created_folder, runtime_fields
from pipeline.core.distributed import barrier
from pipeline.core.manifest import MANIFEST_NAME, write_json_atomic

State = Literal["fresh", "resume", "reuse"]


def config_request(cfg: Any) -> dict:
    """The config fields that decide a stage's output: every dataclass field not declared `Runtime[...]`
    (paths of the output, devices, logging, --force ...)."""
    skip = runtime_fields(type(cfg))
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip}


@dataclass(frozen=True)
class Prepared:
    state: State
    manifest: dict | None = None
    """The finished manifest when state is "reuse"."""


@dataclass
class OutputFolder:
    path: Path
    what: str
    """What the folder holds, for messages ("capture", "sentence dataset", ...)."""
    owns: Callable[[str], bool]
    """Whether a top-level name is this stage's (its files, temp files and subfolders): --force removes
    exactly these."""
    progress: tuple[str, ...] = ()
    """Glob patterns of JSON files that record a partial run's "fingerprint"."""
    finished_files: tuple[str, ...] = ()
    """Files besides manifest.json a finished output must hold to be reused."""
    foreign_ok: bool = False
    """Tolerate names that are not ours (a run folder shared with W&B's files); else refuse them."""
    replace_other: bool = False
    """An output of another request is replaced, not refused: for outputs derived from state that is
    meant to change (the interpretation's results, the meanings) and cheap to remake."""
    flag: str = "--out"

    def prepare(self, request: str, force: bool, info: Any = None) -> Prepared:
        main_rank = info is None or info.is_main
        if main_rank:
            if self.path.exists() and not self.path.is_dir():
                raise PipelineInputError(f"{self.flag} {self.path}: exists and is not a folder")
            if not self.path.exists():
                note_created_folder(self.path)  # a stage that fails before writing into it removes it again
            self.path.mkdir(parents=True, exist_ok=True)
            for p in self.path.glob(".tmp*"):  # left by a process killed inside safetensors' save_file
                if SAFETENSORS_TEMP.fullmatch(p.name):  # (no rank of this run writes before the barrier below)
                    p.unlink(missing_ok=True)
        if info is not None:
            barrier(info)
        if not self.path.is_dir():  # rank 0 made it: this rank is on another node without the shared folder
            raise PipelineInputError(
                f"{self.flag} {self.path}: this rank does not see the folder rank 0 created (a node-local folder?); "
                "every node needs the same folder on a shared filesystem"
            )
        names = sorted(p.name for p in self.path.iterdir())
        foreign = [n for n in names if not self.owns(n)]
        if foreign and not self.foreign_ok:
            raise PipelineInputError(
                f"{self.flag} {self.path}: holds other files ({', '.join(foreign[:3])}); choose an empty or "
                f"{self.what} folder"
            )
        manifest = _read_json(self.path / MANIFEST_NAME)
        finished = (
            manifest is not None
            and manifest.get("fingerprint") == request
            and all((self.path / f).is_file() for f in self.finished_files)
        )
        if finished and not force:
            if main_rank and manifest.get("outcome") != "reused":
                manifest["outcome"] = "reused"
                try:
                    write_json_atomic(self.path / MANIFEST_NAME, manifest)
                except OSError:  # a read-only dataset is still reusable; run_pipeline then says "computed"
                    pass
            return Prepared("reuse", manifest)
        states = [manifest] if (self.path / MANIFEST_NAME).is_file() else []
        states += [_read_json(p) for pattern in self.progress for p in sorted(self.path.glob(pattern))]
        other = any(s is None or s.get("fingerprint") != request for s in states)
        if other and not force and not self.replace_other:
            raise PipelineInputError(
                f"{self.flag} {self.path}: holds a {self.what} made with other settings or inputs; use --force to "
                f"replace it or another {self.flag}"
            )
        if force or other or not self.progress:
            if info is not None:
                barrier(info)
            if main_rank:
                self.wipe()
            if info is not None:
                barrier(info)
            return Prepared("fresh")
        return Prepared("resume" if states else "fresh")

    def wipe(self) -> None:
        """Remove every name of ours (finished or partial, temp files included); leave the rest."""
        for p in self.path.iterdir():
            if self.owns(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
"""The temporary file safetensors' save_file writes beside its target before renaming it (Rust's tempfile
crate: ".tmp" + 6 characters): a kill at that moment leaves one behind."""


def owned_names(*names: str, prefixes: tuple[str, ...] = ()) -> Callable[[str], bool]:
    """An `owns` test: these exact names, names starting with a prefix, their atomic temp files
    (".<name>.*.tmp") and safetensors' temp files."""
    stems = (*names, *prefixes)

    def owns(name: str) -> bool:
        if name in names or name.startswith(prefixes) or SAFETENSORS_TEMP.fullmatch(name):
            return True
        return name.startswith(".") and name.endswith(".tmp") and name[1:].startswith(stems)

    return owns
