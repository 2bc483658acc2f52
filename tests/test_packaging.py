"""`pip install .` outside the checkout gives every module the stage scripts import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def library_modules() -> list[str]:
    """Every importable module of the project: the llama_3 and pipeline packages and sae.py."""
    names = ["sae"]
    for package in ("llama_3", "pipeline"):
        names += [
            f"{package}.{p.stem}" if p.stem != "__init__" else package for p in sorted((REPO / package).glob("*.py"))
        ]
    return names


@pytest.mark.slow
def test_installed_package_imports_every_module_from_outside_the_checkout(tmp_path):
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    done = subprocess.run([*pip, str(REPO)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    code = (
        "import importlib, json, sys\n"
        f"names = {library_modules()!r}\n"
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install's path to the checkout
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    files = json.loads(run.stdout.strip().splitlines()[-1])
    outside = {n: f for n, f in files.items() if not Path(f).resolve().is_relative_to(site.resolve())}
    assert not outside, f"imported from outside the installed package: {outside}"
