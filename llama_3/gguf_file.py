"""A GGUF file's metadata and tensor table, read straight from the bytes.

The `gguf` package's GGUFReader builds a numpy view for every element of every metadata array: for
SmolLM2's tokenizer (49,152 tokens, 48,900 merges) that is ~3 s of Python on each model load, and
every pipeline stage loads the model. Here a string array is one pass over a memory map and a
numeric array one np.frombuffer. Tensors stay memory-mapped, shaped as `gguf.quants.dequantize`
takes them (what GGUFReader hands it). Layout (little-endian, versions 2 and 3):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type u32, value)              string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims u32, dims u64[n_dims] fastest first, ggml type u32, offset u64)
    padding to general.alignment (default 32), then the tensor data (offsets relative to here)
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llama_3.errors import PipelineInputError

# GGUF value types -> struct format of a scalar (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16}
_PLAIN |= {"I32": np.int32, "I64": np.int64}


@dataclass
class GgufTensor:
    name: str
    tensor_type: Any
    """gguf.GGMLQuantizationType."""
    shape: tuple[int, ...]
    """PyTorch order (slowest first): GGML lists dims fastest first."""
    data: np.ndarray
    """Memory-mapped: the values for plain types, the packed blocks (uint8 rows) for quantized ones."""


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.at, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.buf):
            raise PipelineInputError(f"{self.path}: not a readable GGUF file (truncated header)")
        value = struct.unpack_from("<" + fmt, self.buf, self.at)
        self.at += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        raw = self.buf[self.at : self.at + n]
        self.at += n
        return bytes(raw).decode("utf-8")

    def array(self) -> list:
        item_type, n = self.take("IQ")
        if item_type == _STRING:
            return [self.string() for _ in range(n)]
        if item_type == _ARRAY:  # nested arrays come out flattened, as GGUFReader.contents() gives them
            return [v for _ in range(n) for v in self.array()]
        if item_type not in _NUMPY:
            raise PipelineInputError(f"{self.path}: not a readable GGUF file (array of unknown type {item_type})")
        dtype = np.dtype(_NUMPY[item_type])
        values = np.frombuffer(self.buf, dtype, n, self.at)
        self.at += n * dtype.itemsize
        return values.tolist()

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        if value_type not in _SCALARS:
            raise PipelineInputError(f"{self.path}: not a readable GGUF file (value of unknown type {value_type})")
        return self.take(_SCALARS[value_type])


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GgufTensor]]:
    """(metadata {key: value}, tensors in file order) of a GGUF file; one line naming the file if it is not one."""

    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise PipelineInputError(f"{path}: not a readable GGUF file ({e})") from None
    cur = _Cursor(buf, path)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise PipelineInputError(f"{path}: not a readable GGUF file (magic {magic!r}, expected b'GGUF')")
    cur.at = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise PipelineInputError(
            f"{path}: not a readable GGUF file (version {version}: little-endian versions 2 and 3 load)"
        )
    n_tensors, n_kv = cur.take("QQ")
    meta: dict[str, Any] = {}
    try:
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("I")
            dims = [cur.take("Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.take("I"), cur.take("Q")))
    except (UnicodeDecodeError, struct.error, ValueError) as e:
        raise PipelineInputError(f"{path}: not a readable GGUF file ({e})") from None
    alignment = int(meta.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise PipelineInputError(f"{path}: general.alignment {alignment} is not a power of two")
    start = -(-cur.at // alignment) * alignment
    tensors = []
    for name, dims, raw_type, offset in infos:
        qtype = gguf.GGMLQuantizationType(raw_type)
        shape = tuple(int(d) for d in reversed(dims))
        n_elems = int(np.prod(dims)) if dims else 1
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if qtype.name in _PLAIN:
            dtype, count, np_shape = np.dtype(_PLAIN[qtype.name]).newbyteorder("<"), n_elems, shape
        else:
            dtype, count = np.dtype(np.uint8), n_elems * type_size // block
            np_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        if start + offset + count * dtype.itemsize > len(buf):
            raise PipelineInputError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        data = np.frombuffer(buf, dtype, count, start + offset).reshape(np_shape)
        tensors.append(GgufTensor(name, qtype, shape, data))
    return meta, tensors
