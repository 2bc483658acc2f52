"""Our GGUF reader against the `gguf` package's own writer and reader: metadata of every value type,
plain and quantized tensors, the embedded SmolLM2 file, and truncated or foreign files."""

from __future__ import annotations

import numpy as np
import pytest

from llama_3 import PipelineInputError, default_model_path
from llama_3.gguf_file import read_gguf


def reference(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}, r.tensors


def assert_same(path) -> None:
    meta, tensors = read_gguf(path)
    ref_meta, ref_tensors = reference(path)
    assert meta == ref_meta
    assert [t.name for t in tensors] == [t.name for t in ref_tensors]
    for ours, theirs in zip(tensors, ref_tensors):
        assert ours.tensor_type == theirs.tensor_type, ours.name
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape.tolist())), ours.name
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, ours.name
        assert np.array_equal(ours.data, theirs.data), ours.name


def test_every_value_type_and_tensor_kind_reads_as_gguf_reads_it(tmp_path):
    import gguf

    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -5), w.add_uint16("t.u16", 60000), w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000), w.add_int32("t.i32", -7), w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2**40), w.add_int64("t.i64", -(2**40)), w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True), w.add_string("t.str", "naïve ∑ text")
    w.add_array("t.strings", ["a", "", "ünï", "x" * 300]), w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5]), w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("plain32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("plain16", rng.standard_normal((4, 64)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert_same(path)
    meta, tensors = read_gguf(path)
    assert meta["t.strings"] == ["a", "", "ünï", "x" * 300] and meta["t.bool"] is True
    assert [t.shape for t in tensors] == [(3, 5), (4, 64), (2, 64)]


def test_the_embedded_smollm2_and_the_tiny_test_model_read_as_gguf_reads_them(tiny):
    assert_same(tiny.gguf_path)
    assert_same(default_model_path())


def test_truncated_and_foreign_files_are_one_line_errors(tiny, tmp_path):
    whole = tiny.gguf_path.read_bytes()
    for name, data in [("cut.gguf", whole[: len(whole) // 2]), ("head.gguf", whole[:200]), ("txt.gguf", b"hello")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PipelineInputError, match=rf"{name}: (not a readable GGUF file|tensor .* runs past)"):
            read_gguf(tmp_path / name)
