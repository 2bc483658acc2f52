"""The bad-input matrix: for every stage, bad inputs (missing, empty, truncated, corrupted, mismatched,
wrong type, enormous) and the one-line error the user sees.

Each row copies the tiny pipeline's finished run, breaks one input, runs the stage script and
requires exit status 2, no traceback, and a last stderr line `error: ...` that names the file or
flag. docs/bad_inputs.md is this table with the messages the stages print; the test fails when it
is out of date. Regenerate it with:

    python tests/test_bad_input_matrix.py      # runs every row, rewrites docs/bad_inputs.md
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # as a script too
from tiny_pipeline import REPO, run  # noqa: E402

DOC = REPO / "docs" / "bad_inputs.md"


def truncate(pattern: str, keep: int | None = None) -> Callable[[Path], None]:
    """Cut the first matching file to `keep` bytes (default: half)."""
    def go(root: Path) -> None:
        f = sorted(root.glob(pattern))[0]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2 if keep is None else keep])
    return go


def flip(pattern: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        f = sorted(root.glob(pattern))[0]
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        f.write_bytes(bytes(data))
    return go


def write(rel: str, content: bytes | str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content.encode() if isinstance(content, str) else content)
    return go


def edit_json(rel: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        doc = json.loads((root / rel).read_text())
        change(doc)
        (root / rel).write_text(json.dumps(doc))
    return go


def delete(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def nothing(root: Path) -> None:
    pass


def other_model(doc: dict) -> None:
    doc["model"]["config_sha256"] = "0" * 64


@dataclass(frozen=True)
class Row:
    stage: str
    input: str
    kind: str
    mutate: Callable[[Path], None]
    args: tuple[str, ...]
    expect: str
    """A regex the error line must match (the file or flag it names)."""


ROWS = [
    Row("sentences", "--input", "missing", nothing, ("--input", "no_such.txt", "--out", "runs/s2"), r"no_such\.txt"),
    Row("sentences", "--input", "empty", write("empty.txt", ""), ("--input", "empty.txt", "--out", "runs/s2"), r"empty\.txt|no document"),
    Row("sentences", "--input", "wrong type", write("data.bin", bytes(range(256)) * 64), ("--input", "data.bin", "--out", "runs/s2"), r"data\.bin"),
    Row("sentences", "--out", "mismatched", nothing, ("--out", "runs/activations"), r"--out runs/activations"),
    Row("capture", "--sentences", "missing", nothing, ("--sentences", "runs/nope", "--out", "runs/a2"), r"runs/nope"),
    Row("capture", "sentence shard", "truncated", truncate("runs/sentences/*.parquet"), ("--out", "runs/a2"), r"sentences-00000\.parquet"),
    Row("capture", "sentence shard", "corrupted", flip("runs/sentences/*.parquet"), ("--out", "runs/a2"), r"sentences-00000\.parquet"),
    Row("capture", "--model", "wrong type", nothing, ("--model", "runs/sentences/manifest.json", "--out", "runs/a2"), r"manifest\.json"),
    Row("capture", "--hook-points", "mismatched", nothing, ("--hook-points", "resid_pre.99", "--out", "runs/a2"), r"resid_pre\.99"),
    Row("capture", "--max-tokens", "enormous", nothing, ("--max-tokens", "1000000000", "--out", "runs/a2"), r"--max-tokens"),
    Row("preprocessing", "--capture", "missing", nothing, ("--capture", "runs/nope", "--out", "runs/p2"), r"runs/nope"),
    Row("preprocessing", "activation shard", "truncated", truncate("runs/activations/acts-*.safetensors"), ("--out", "runs/p2"), r"acts-r000-\d+\.safetensors"),
    Row("preprocessing", "activation shard", "corrupted", flip("runs/activations/acts-*.safetensors"), ("--out", "runs/p2"), r"acts-r000-\d+\.safetensors"),
    Row("preprocessing", "capture manifest", "wrong type", write("runs/activations/manifest.json", "[]"), ("--out", "runs/p2"), r"manifest\.json"),
    Row("preprocessing", "--hook-point", "mismatched", nothing, ("--hook-point", "resid_pre.2", "--out", "runs/p2"), r"resid_pre\.2"),
    Row("preprocessing", "--batch-size", "enormous", nothing, ("--batch-size", "1000000000000", "--out", "runs/p2"), r"--batch-size"),
    Row("training", "--data", "missing", nothing, ("--data", "runs/nope", "--out", "runs/t2"), r"runs/nope"),
    Row("training", "train_acts.npy", "truncated", truncate("runs/preprocessed/train_acts.npy"), ("--out", "runs/t2"), r"train_acts\.npy"),
    Row("training", "preprocessing manifest", "truncated", truncate("runs/preprocessed/manifest.json", keep=20), ("--out", "runs/t2"), r"manifest\.json"),
    Row("training", "--k", "mismatched", nothing, ("--k", "100000", "--out", "runs/t2"), r"--k 100000"),
    Row("training", "--batch-size", "enormous", nothing, ("--batch-size", "1000000000000", "--out", "runs/t2"), r"--batch-size"),
    Row("training", "checkpoint", "truncated", lambda r: (truncate("runs/sae/checkpoint/state.safetensors")(r), delete("runs/sae/manifest.json")(r)),
        (), r"state\.safetensors"),
    Row("top_sentences", "--sae", "missing", nothing, ("--sae", "runs/nope", "--out", "runs/ts2"), r"runs/nope"),
    Row("top_sentences", "sae.safetensors", "truncated", truncate("runs/sae/sae/sae.safetensors"), ("--out", "runs/ts2"), r"sae\.safetensors"),
    Row("top_sentences", "cfg.json", "wrong type", write("runs/sae/sae/cfg.json", "not json"), ("--out", "runs/ts2"), r"cfg\.json"),
    Row("top_sentences", "SAE of another model", "mismatched", edit_json("runs/sae/sae/cfg.json", other_model), ("--out", "runs/ts2"), r"--sae"),
    Row("top_sentences", "--top-n", "empty", nothing, ("--top-n", "0", "--out", "runs/ts2"), r"--top-n"),
    Row("interpret_send", "--top-sentences", "missing", nothing, ("--top-sentences", "runs/nope"), r"runs/nope"),
    Row("interpret_send", "top_sentences.parquet", "corrupted", flip("runs/top_sentences/top_sentences.parquet"), (), r"top_sentences\.parquet"),
    Row("interpret_send", "--aggregation", "mismatched", nothing, ("--aggregation", "median"), r"--aggregation"),
    Row("interpret_parse", "results file", "truncated", truncate("runs/interpretation/explain/results/*.jsonl"), (), r"results/offline-0\.jsonl"),
    Row("interpret_parse", "--out", "empty", nothing, ("--out", "runs/nope"), r"runs/nope"),
    Row("steering_eval", "--modes", "mismatched", nothing, ("--modes", "boost", "--force"), r"--modes"),
    Row("steering_eval", "--meanings", "missing", nothing, ("--meanings", "runs/nope", "--force"), r"--meanings runs/nope"),
    Row("steering_eval", "top_sentences.parquet", "corrupted", flip("runs/top_sentences/top_sentences.parquet"), ("--force",),
        r"top_sentences\.parquet"),
]


def row_id(row: Row) -> str:
    return f"{row.stage}-{row.input}-{row.kind}".replace(" ", "_")


def run_row(root: Path, plan: dict, row: Row, work: Path) -> str:
    shutil.copytree(root, work)
    row.mutate(work)
    stage = plan[row.stage]
    stage = type(stage)(stage.name, stage.script, (*stage.args, *row.args), stage.forceable)
    done = run(stage, work)
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), done.stderr[-2000:]
    model = plan["capture"].args[plan["capture"].args.index("--model") + 1]
    return line.replace(str(work) + "/", "").replace(str(work), ".").replace(model, "<model>")


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_bad_input_gives_one_line_naming_it(tiny_pipeline, tmp_path, row):
    root, plan, _, _ = tiny_pipeline
    line = run_row(root, plan, row, tmp_path / "work")
    assert re.search(row.expect, line), line
    documented = documented_messages()
    assert documented.get(row_id(row)) == line[len("error: "):], \
        f"docs/bad_inputs.md is out of date for {row_id(row)}; run python tests/test_bad_input_matrix.py"


def documented_messages() -> dict[str, str]:
    out = {}
    for line in DOC.read_text().splitlines() if DOC.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("stage", "---"):
            out[f"{cells[0]}-{cells[1].strip('`')}-{cells[2]}".replace(" ", "_")] = cells[4].strip("`").replace("\\|", "|")
    return out


def write_doc() -> None:
    """Run every row against a fresh tiny pipeline and write docs/bad_inputs.md."""
    import tempfile

    from tiny_checkpoints import make_hf_reference, write_hf_tokenizer
    from tiny_pipeline import build_reference

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference, tok = make_hf_reference(seed=0)
        reference.save_pretrained(tmp / "hf")
        write_hf_tokenizer(tok, tmp / "hf")
        (tmp / "runs_root").mkdir()
        root, plan, _, _ = build_reference(tmp / "runs_root", tmp / "hf")
        lines = ["# Bad inputs: what each stage is given and what the user sees", "",
                 "Generated by `python tests/test_bad_input_matrix.py` from the rows that "
                 "`tests/test_bad_input_matrix.py` runs (each against a finished tiny pipeline, one input broken). "
                 "Every row exits with status 2 and prints no traceback. "
                 "Paths are relative to the run's working directory.", "",
                 "| stage | input | bad | flags | error shown |", "|---|---|---|---|---|"]
        for i, row in enumerate(ROWS):
            line = run_row(root, plan, row, tmp / f"row{i}")
            message = line[len("error: "):].replace("|", "\\|")
            flags = " ".join(row.args).replace("|", "\\|")
            lines.append(f"| {row.stage} | `{row.input}` | {row.kind} | {flags and f'`{flags}`'} | `{message}` |")
            print(lines[-1])
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_doc()
