"""The import graph follows the layers: llama_3/ (the model) imports nothing of the pipeline; each pipeline/
layer imports only llama_3/ and the layers below it; no script imports a script; bench/ imports the package
only; a test may import a script's own definitions (its main, its command-line config), never the package's
code through a script. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    "core",
    "sentences",
    "capture",
    "preprocessing",
    "sae",
    "top_sentences",
    "interpret",
    "steering",
    "report",
]
"""pipeline/'s subpackages, lowest first (pipeline/__init__.py says what each holds)."""
SCRIPTS = {p.stem for p in REPO.glob("*.py")}


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def layer_of(module: str) -> int | None:
    """The layer index of a pipeline module (`pipeline.sae.model` -> 4); None for `pipeline` itself."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if parts[0] == "pipeline" and len(parts) > 1 else None


def top_level_defs(script: str) -> set[str]:
    tree = ast.parse((REPO / f"{script}.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def violations(path: Path) -> list[str]:
    rel = path.relative_to(REPO)
    where = rel.parts[0] if len(rel.parts) > 1 else "script"
    out = []
    for line, module, names in imports(path):
        root = module.split(".")[0]
        at = f"{rel}:{line} imports {module}"
        if root in SCRIPTS and where != "tests":
            out.append(f"{at}: a script (run scripts as processes; import the package)")
        elif root in SCRIPTS:  # tests: the script's own definitions only
            foreign = [n for n in names if n not in top_level_defs(root)]
            if not names or foreign:
                out.append(f"{at}: {foreign or 'the module'} (not defined in the script: import it from the package)")
        elif where == "llama_3" and root == "pipeline":
            out.append(f"{at}: llama_3/ is below the pipeline")
        elif where == "pipeline" and root == "pipeline":
            own, other = layer_of(".".join(rel.with_suffix("").parts)), layer_of(module)
            if own is not None and (other is None or other > own):
                out.append(f"{at}: an upward import (layer {LAYERS[own]} -> {module})")
    return out


def python_files() -> list[Path]:
    folders = ("llama_3", "pipeline", "bench", "tests", "scripts")
    return sorted(REPO.glob("*.py")) + sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def test_every_import_follows_the_layers():
    found = [v for p in python_files() for v in violations(p)]
    assert not found, "\n".join(found)


def test_every_pipeline_subpackage_is_a_layer():
    packages = {p.parent.name for p in (REPO / "pipeline").glob("*/__init__.py")}
    assert packages == set(LAYERS)
    assert not [p.name for p in (REPO / "pipeline").glob("*.py") if p.name != "__init__.py"]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from pipeline.report.report import write_report\n", "upward import (layer sae -> pipeline.report.report)"),
        ("def f():\n    from pipeline.steering import splice\n", "upward import (layer sae -> pipeline.steering)"),
        ("import sae_training\n", "a script"),
        ("from pipeline.core.manifest import fingerprint\nfrom llama_3 import load_model\n", None),
    ],
)
def test_the_checker_finds_an_upward_import(tmp_path, monkeypatch, source, expected):
    """The checker itself, on a module planted in the sae layer: it must see what the real tree avoids."""
    fake_repo = tmp_path / "repo"
    (fake_repo / "pipeline" / "sae").mkdir(parents=True)
    planted = fake_repo / "pipeline" / "sae" / "planted.py"
    planted.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake_repo)
    found = violations(planted)
    assert (expected in found[0]) if expected else not found, found


def test_imports_inside_functions_say_why():
    """Imports sit at the top of a module; one inside a function (a slow or optional package, a cycle) has a
    comment on the line above (or its own line) saying why."""
    unexplained = []
    for path in python_files():
        if path.parts[len(REPO.parts)] in ("tests", "bench"):
            continue
        text = path.read_text()
        lines, tree = text.splitlines(), ast.parse(text)
        module_level = {id(n) for n in tree.body} | {
            id(n) for top in tree.body if isinstance(top, (ast.If, ast.Try)) for n in ast.walk(top)
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in module_level:
                above, own = lines[node.lineno - 2].strip(), lines[node.lineno - 1]
                if not (above.startswith("#") or "#" in own):
                    unexplained.append(f"{path.relative_to(REPO)}:{node.lineno}: {own.strip()}")
    assert not unexplained, "\n".join(unexplained)
