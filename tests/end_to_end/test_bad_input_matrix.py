"""The bad-input matrix: for every stage, bad inputs (missing, empty, truncated, corrupted, mismatched,
wrong type, enormous) and the one-line error the user sees.

Each row copies the tiny pipeline's finished run, breaks one input, runs the stage script and
requires exit status 2, no traceback, and a last stderr line `error: ...` that names the file or
flag. docs/bad_inputs.md is this table with the messages the stages print; the test fails when it
is out of date. Regenerate it with:

    python tests/end_to_end/test_bad_input_matrix.py      # runs every row, rewrites docs/bad_inputs.md
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
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]  # as a script too
from tiny_pipeline import REPO, run  # noqa: E402

DOC = REPO / "docs" / "bad_inputs.md"
# CI's second pass (ATen and oneDNN capped to AVX2) selects this module along with the quick suite.
pytestmark = pytest.mark.bad_input_matrix


def truncate(pattern: str, keep: int | None = None) -> Callable[[Path], None]:
    """Cut the first matching file to `keep` bytes (default: half)."""

    def go(root: Path) -> None:
        f = sorted(root.glob(pattern))[0]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2 if keep is None else keep])

    return go


def cut_in_line(pattern: str, line: int) -> Callable[[Path], None]:
    """Cut the first matching text file in the middle of its `line`-th line (1-based), whatever the lines hold."""

    def go(root: Path) -> None:
        f = sorted(root.glob(pattern))[0]
        lines = f.read_bytes().splitlines(keepends=True)
        f.write_bytes(b"".join(lines[: line - 1]) + lines[line - 1][: len(lines[line - 1]) // 2])

    return go


def flip(pattern: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        f = sorted(root.glob(pattern))[0]
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
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
    varies: str | None = None
    """A regex for what differs with package versions (a parquet file's size): shown as <varies> in the document."""


ROWS = [
    Row("sentences", "--input", "missing", nothing, ("--input", "no_such.txt", "--out", "runs/s2"), r"no_such\.txt"),
    Row(
        "sentences",
        "--input",
        "empty",
        write("empty.txt", ""),
        ("--input", "empty.txt", "--out", "runs/s2"),
        r"empty\.txt|no document",
    ),
    Row(
        "sentences",
        "--input",
        "wrong type",
        write("data.bin", bytes(range(256)) * 64),
        ("--input", "data.bin", "--out", "runs/s2"),
        r"data\.bin",
    ),
    Row("sentences", "--out", "mismatched", nothing, ("--out", "runs/activations"), r"--out runs/activations"),
    Row("capture", "--sentences", "missing", nothing, ("--sentences", "runs/nope", "--out", "runs/a2"), r"runs/nope"),
    Row(
        "capture",
        "sentence shard",
        "truncated",
        truncate("runs/sentences/*.parquet", keep=4096),
        ("--out", "runs/a2"),
        r"sentences-00000\.parquet",
        varies=r"(?<=says )\d+",
    ),
    Row(
        "capture",
        "sentence shard",
        "corrupted",
        flip("runs/sentences/*.parquet"),
        ("--out", "runs/a2"),
        r"sentences-00000\.parquet",
    ),
    Row(
        "capture",
        "--model",
        "wrong type",
        nothing,
        ("--model", "runs/sentences/manifest.json", "--out", "runs/a2"),
        r"manifest\.json",
    ),
    Row(
        "capture",
        "--hook-points",
        "mismatched",
        nothing,
        ("--hook-points", "resid_pre.99", "--out", "runs/a2"),
        r"resid_pre\.99",
    ),
    Row(
        "capture",
        "--max-tokens",
        "enormous",
        nothing,
        ("--max-tokens", "1000000000", "--out", "runs/a2"),
        r"--max-tokens",
    ),
    Row("preprocessing", "--capture", "missing", nothing, ("--capture", "runs/nope", "--out", "runs/p2"), r"runs/nope"),
    Row(
        "preprocessing",
        "activation shard",
        "truncated",
        truncate("runs/activations/acts-*.safetensors"),
        ("--out", "runs/p2"),
        r"acts-r000-\d+\.safetensors",
    ),
    Row(
        "preprocessing",
        "activation shard",
        "corrupted",
        flip("runs/activations/acts-*.safetensors"),
        ("--out", "runs/p2"),
        r"acts-r000-\d+\.safetensors",
    ),
    Row(
        "preprocessing",
        "capture manifest",
        "wrong type",
        write("runs/activations/manifest.json", "[]"),
        ("--out", "runs/p2"),
        r"manifest\.json",
    ),
    Row(
        "preprocessing",
        "--hook-point",
        "mismatched",
        nothing,
        ("--hook-point", "resid_pre.2", "--out", "runs/p2"),
        r"resid_pre\.2",
    ),
    Row(
        "preprocessing",
        "--batch-size",
        "enormous",
        nothing,
        ("--batch-size", "1000000000000", "--out", "runs/p2"),
        r"--batch-size",
    ),
    Row("training", "--data", "missing", nothing, ("--data", "runs/nope", "--out", "runs/t2"), r"runs/nope"),
    Row(
        "training",
        "train_acts.npy",
        "truncated",
        truncate("runs/preprocessed/train_acts.npy"),
        ("--out", "runs/t2"),
        r"train_acts\.npy",
    ),
    Row(
        "training",
        "preprocessing manifest",
        "truncated",
        truncate("runs/preprocessed/manifest.json", keep=20),
        ("--out", "runs/t2"),
        r"manifest\.json",
    ),
    Row("training", "--k", "mismatched", nothing, ("--k", "100000", "--out", "runs/t2"), r"--k 100000"),
    Row(
        "training",
        "--batch-size",
        "enormous",
        nothing,
        ("--batch-size", "1000000000000", "--out", "runs/t2"),
        r"--batch-size",
    ),
    Row("training", "--suite", "missing", nothing, ("--suite", "nope.json"), r"nope\.json"),
    Row(
        "training",
        "--suite",
        "corrupted",
        write("suite.json", '[{"out": "runs/t2",'),
        ("--suite", "suite.json"),
        r"suite\.json",
    ),
    Row(
        "training",
        "--target-data",
        "mismatched",
        nothing,
        ("--target-data", "runs/preprocessed", "--out", "runs/t2"),
        r"--target-data runs/preprocessed",
    ),
    Row(
        "training",
        "checkpoint",
        "truncated",
        lambda r: (truncate("runs/sae/checkpoint/state.safetensors")(r), delete("runs/sae/manifest.json")(r)),
        (),
        r"state\.safetensors",
    ),
    Row("top_sentences", "--sae", "missing", nothing, ("--sae", "runs/nope", "--out", "runs/ts2"), r"runs/nope"),
    Row(
        "top_sentences",
        "sae.safetensors",
        "truncated",
        truncate("runs/sae/sae/sae.safetensors"),
        ("--out", "runs/ts2"),
        r"sae\.safetensors",
    ),
    Row(
        "top_sentences",
        "cfg.json",
        "wrong type",
        write("runs/sae/sae/cfg.json", "not json"),
        ("--out", "runs/ts2"),
        r"cfg\.json",
    ),
    Row(
        "top_sentences",
        "SAE of another model",
        "mismatched",
        edit_json("runs/sae/sae/cfg.json", other_model),
        ("--out", "runs/ts2"),
        r"--sae",
    ),
    Row("top_sentences", "--top-n", "empty", nothing, ("--top-n", "0", "--out", "runs/ts2"), r"--top-n"),
    Row(
        "top_sentences",
        "--capture",
        "missing",
        nothing,
        ("--source", "capture", "--capture", "runs/nope", "--out", "runs/ts2"),
        r"runs/nope",
    ),
    Row(
        "top_sentences",
        "activation shard",
        "truncated",
        truncate("runs/activations/acts-r000-00000.safetensors"),
        ("--source", "capture", "--out", "runs/ts2"),
        r"acts-r000-00000\.safetensors",
    ),
    Row("interpret_send", "--top-sentences", "missing", nothing, ("--top-sentences", "runs/nope"), r"runs/nope"),
    Row(
        "interpret_send",
        "top_sentences.parquet",
        "corrupted",
        flip("runs/top_sentences/top_sentences.parquet"),
        (),
        r"top_sentences\.parquet",
    ),
    Row("interpret_send", "--aggregation", "mismatched", nothing, ("--aggregation", "median"), r"--aggregation"),
    Row(
        "interpret_parse",
        "results file",
        "truncated",
        cut_in_line("runs/interpretation/explain/results/*.jsonl", 3),
        (),
        r"results/offline-0\.jsonl",
    ),
    Row("interpret_parse", "--out", "empty", nothing, ("--out", "runs/nope"), r"runs/nope"),
    Row("steering_eval", "--factors", "out of range", nothing, ("--factors", "0", "--force"), r"--factors"),
    Row("steering_eval", "--latents", "mismatched", nothing, ("--latents", "99999", "--force"), r"--latents \[99999\]"),
    Row(
        "steering_eval",
        "--meanings",
        "missing",
        nothing,
        ("--meanings", "runs/nope", "--force"),
        r"--meanings runs/nope",
    ),
    Row(
        "steering_eval",
        "top_sentences.parquet",
        "corrupted",
        flip("runs/top_sentences/top_sentences.parquet"),
        ("--force",),
        r"top_sentences\.parquet",
    ),
]


def row_id(row: Row) -> str:
    return f"{row.stage}-{row.input}-{row.kind}".replace(" ", "_")


# What a CPU without native bf16 looks like to ATen and oneDNN, on any x86 machine.
CAPPED_TO_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@dataclass(frozen=True)
class DtypeRow:
    """A dtype choice on a CPU without native bf16: the stage runs (exit 0) on the slower path."""

    stage: str
    args: tuple[str, ...]
    warning: str | None
    """The flag the one warning line names; None: no warning (nothing is emulated)."""


DTYPE_ROWS = [
    DtypeRow("capture", ("--model-dtype", "bfloat16", "--out", "runs/a2"), "--model-dtype bfloat16"),
    DtypeRow("capture", ("--storage-dtype", "float16", "--out", "runs/a2"), None),
    DtypeRow("capture", ("--storage-dtype", "float32", "--out", "runs/a2"), None),
    DtypeRow("training", ("--autocast", "on", "--out", "runs/t2"), "--autocast on"),
    DtypeRow("top_sentences", ("--model-dtype", "bfloat16", "--out", "runs/ts2"), "--model-dtype bfloat16"),
    DtypeRow("steering_eval", ("--dtype", "bfloat16", "--force"), "--dtype bfloat16"),
]


def dtype_row_id(row: DtypeRow) -> str:
    return f"{row.stage}-{'_'.join(row.args[:2])}".replace("--", "")


def run_stage_on_copy(
    root: Path,
    plan: dict,
    name: str,
    args: tuple[str, ...],
    work: Path,
    mutate: Callable[[Path], None] = nothing,
    env: dict | None = None,
):
    """The finished tiny pipeline copied to `work`, changed by `mutate`, then one stage run there with `args` added."""
    shutil.copytree(root, work)
    mutate(work)
    stage = plan[name]
    return run(type(stage)(stage.name, stage.script, (*stage.args, *args), stage.forceable), work, env)


def run_dtype_row(root: Path, plan: dict, row: DtypeRow, work: Path) -> str:
    """Run the row under the AVX2 cap; returns its warning line ('' when none), or fails the test."""
    done = run_stage_on_copy(root, plan, row.stage, row.args, work, env=CAPPED_TO_AVX2)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "matmuls run emulated" in line]
    if row.warning is None:
        assert not warnings, warnings
        return ""
    assert len(warnings) == 1 and row.warning in warnings[0], done.stderr[-2000:]
    return warnings[0].split(": ", 1)[1]


def run_row(root: Path, plan: dict, row: Row, work: Path) -> str:
    done = run_stage_on_copy(root, plan, row.stage, row.args, work, row.mutate)
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), done.stderr[-2000:]
    model = plan["capture"].args[plan["capture"].args.index("--model") + 1]
    # The tiny model's config.json is written by whatever transformers is installed, so its hash is
    # not the same on every machine; the document shows it masked.
    config_hash = json.loads((root / "runs/activations/manifest.json").read_text())["inputs"]["model"]["config_sha256"]
    line = line.replace(str(work) + "/", "").replace(str(work), ".").replace(model, "<model>")
    line = line.replace(config_hash[:12], "<config_sha256>")
    return re.sub(row.varies, "<varies>", line) if row.varies else line


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_bad_input_gives_one_line_naming_it(tiny_pipeline, tmp_path, row):
    root, plan, _, _ = tiny_pipeline
    line = run_row(root, plan, row, tmp_path / "work")
    assert re.search(row.expect, line), line
    documented = documented_messages()
    assert documented.get(row_id(row)) == line[len("error: ") :], (
        f"docs/bad_inputs.md is out of date for {row_id(row)}; run python tests/end_to_end/test_bad_input_matrix.py"
    )


@pytest.mark.slow
@pytest.mark.parametrize("row", DTYPE_ROWS, ids=dtype_row_id)
def test_dtype_choice_without_native_bf16_runs_on_the_slower_path(tiny_pipeline, tmp_path, row):
    root, plan, _, _ = tiny_pipeline
    warning = run_dtype_row(root, plan, row, tmp_path / "work")
    if row.stage == "capture":  # what was stored is still the model's activations, as fp32 computed them
        from safetensors.torch import load_file

        for ref in sorted((root / "runs/activations").glob("acts-*.safetensors")):
            a, b = load_file(str(ref)), load_file(str(tmp_path / "work/runs/a2" / ref.name))
            assert torch.equal(a["token_ids"], b["token_ids"])
            for key in (k for k in a if k.startswith("act.")):
                x, y = a[key].float(), b[key].float()
                assert x.shape == y.shape
                rel = ((x - y).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)).median().item()
                assert rel < (5e-2 if "bfloat16" in row.args else 1e-2), rel
    assert documented_dtype_rows().get(dtype_row_id(row)) == warning, (
        f"docs/bad_inputs.md is out of date for {dtype_row_id(row)}; "
        "run python tests/end_to_end/test_bad_input_matrix.py"
    )


def _doc_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def documented_messages() -> dict[str, str]:
    out = {}
    for line in DOC.read_text().splitlines() if DOC.is_file() else []:
        cells = _doc_cells(line)
        if len(cells) == 5 and cells[0] not in ("stage", "---"):
            out[f"{cells[0]}-{cells[1].strip('`')}-{cells[2]}".replace(" ", "_")] = (
                cells[4].strip("`").replace("\\|", "|")
            )
    return out


def documented_dtype_rows() -> dict[str, str]:
    out = {}
    for line in DOC.read_text().splitlines() if DOC.is_file() else []:
        cells = _doc_cells(line)
        if len(cells) == 3 and cells[0] not in ("stage", "---"):
            args = tuple(cells[1].strip("`").split())
            out[dtype_row_id(DtypeRow(cells[0], args, None))] = (
                cells[2].strip("`") if cells[2] != "runs, no warning" else ""
            )
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
        lines = [
            "# Bad inputs: what each stage is given and what the user sees",
            "",
            "Generated by `python tests/end_to_end/test_bad_input_matrix.py` from the rows that "
            "`tests/end_to_end/test_bad_input_matrix.py` runs (each against a finished tiny pipeline, one input "
            "broken). "
            "Every row exits with status 2 and prints no traceback. "
            "Paths are relative to the run's working directory.",
            "",
            "| stage | input | bad | flags | error shown |",
            "|---|---|---|---|---|",
        ]
        for i, row in enumerate(ROWS):
            line = run_row(root, plan, row, tmp / f"row{i}")
            message = line[len("error: ") :].replace("|", "\\|")
            flags = " ".join(row.args).replace("|", "\\|")
            lines.append(f"| {row.stage} | `{row.input}` | {row.kind} | {flags and f'`{flags}`'} | `{message}` |")
            print(lines[-1])
        lines += [
            "",
            "## Dtype choices on a CPU without native bf16",
            "",
            "Each row runs with ATen and oneDNN capped to AVX2 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, "
            "as CI's second pass runs the quick suite), exits 0 and prints no traceback; a choice that makes "
            "matmuls run emulated prints this one warning line and goes on, on the slower path.",
            "",
            "| stage | flags | warning |",
            "|---|---|---|",
        ]
        for i, row in enumerate(DTYPE_ROWS):
            warning = run_dtype_row(root, plan, row, tmp / f"dtype{i}")
            lines.append(
                f"| {row.stage} | `{' '.join(row.args)}` | {f'`{warning}`' if warning else 'runs, no warning'} |"
            )
            print(lines[-1])
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_doc()
