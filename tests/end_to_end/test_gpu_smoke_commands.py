"""bench/gpu_smoke.sh runs only on a GPU box, where a renamed flag costs a GPU session: every stage command in it is
parsed here with that stage's own parser (the flags as the script's config dataclass defines them)."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from pipeline.core.cli import parse_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "bench" / "gpu_smoke.sh"


def smoke_commands() -> list[tuple[str, str, list[str]]]:
    """(step name, script, argv) for each `step NAME SECONDS [torchrunN] python SCRIPT.py ARGS` line."""
    text = SMOKE.read_text().replace("\\\n", " ")  # continuation lines joined
    out = []
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=True)
        if len(words) < 4 or words[0] != "step":
            continue
        name, rest = words[1], words[3:]
        scripts = [i for i, w in enumerate(rest) if w.endswith(".py")]
        if scripts:
            out.append((name, rest[scripts[0]], rest[scripts[0] + 1 :]))
    return out


def config_class(script: str):
    """The dataclass the script hands to parse_config in its __main__ block."""
    source = (REPO / script).read_text()
    match = re.search(r"parse_config\((\w+),", source)
    assert match, f"{script}: no parse_config(Config, ...) call"
    module = importlib.import_module(script[:-3].replace("/", "."))
    return getattr(module, match.group(1))


COMMANDS = smoke_commands()


def test_the_smoke_has_every_stage():
    scripts = {script for _, script, _ in COMMANDS}
    stages = {p.name for p in REPO.glob("*.py") if "parse_config(" in p.read_text() and p.name != "run_pipeline.py"}
    # the Gradio page's session runs in the gradio_session step; sae.py export is CPU-only file work
    stages -= {"llama_3_inference_text_completion_gradio.py", "sae.py"}
    assert stages <= scripts, f"stages the smoke never runs: {sorted(stages - scripts)}"
    assert all(limit.isdigit() for limit in re.findall(r"^\s*step \S+ (\S+)", SMOKE.read_text(), re.M))


@pytest.mark.parametrize("name,script,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_smoke_command_parses_with_the_stage_parser(name, script, argv):
    if script.startswith("bench/"):
        source = (REPO / script).read_text()
        flags = {
            n.value
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Constant) and str(n.value).startswith("--")
        }
        unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in flags]
        assert not unknown, f"{name}: {script} has no flag {unknown}"
        return
    cfg = parse_config(config_class(script), argv)  # argparse exits 2 on an unknown flag or a bad value
    assert cfg is not None
