"""The same results on AVX2-only, AVX-512 and AMX CPUs.

ATen and oneDNN are held to a lower instruction set in subprocesses (`ATEN_CPU_CAPABILITY`,
`ONEDNN_MAX_CPU_ISA`), so every check runs on any x86 machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_3 import load_model
from llama_3.cpu_features import onednn_allows

REPO = Path(__file__).resolve().parents[2]
CAPS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}

# Builds the tests' tiny reference model and prints the sha256 of every weight's bytes.
TINY_MODEL_DIGEST = """
import hashlib, json, sys
sys.path[:0] = ["tests", "."]
from tiny_checkpoints import make_hf_reference
model, tok = make_hf_reference(seed=0)
h = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    h.update(name.encode()); h.update(t.contiguous().numpy().tobytes())
print(json.dumps({"weights": h.hexdigest(), "vocab": tok.get_vocab_size()}))
"""

# What the CPU probes answer, and whether the bf16 paths run and compute the right thing.
PROBES = """
import json, sys
sys.path[:0] = ["."]
import torch
from llama_3.cpu_features import can_prepack, has_native_bf16, onednn_has_bf16
from llama_3.cpu_fast import apply_cpu_fast_paths, revert_cpu_fast_paths
from llama_3.model import ModelArgs, Transformer
from pipeline.sae.model import encoder_preacts
g = torch.Generator().manual_seed(0)
x, W, b = torch.randn(64, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
exact = (x.double() @ W.double().T + b.double())
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = encoder_preacts(x, W, b)
torch.manual_seed(0)
model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, hidden_dim=64)).bfloat16()
tokens = torch.randint(0, 50, (2, 7), generator=g)
packed = apply_cpu_fast_paths(model) > 0
with torch.inference_mode():
    out = model(tokens).double()
    revert_cpu_fast_paths(model)
    ref = model(tokens).double()
print(json.dumps({
    "native_bf16": has_native_bf16(), "onednn_bf16": onednn_has_bf16(),
    "prepack_bf16": can_prepack(torch.bfloat16), "prepack_fp32": can_prepack(torch.float32),
    "packed_bf16_linear": packed,
    "autocast_dtype": str(y.dtype), "autocast_rel_err": ((y.double() - exact).norm() / exact.norm()).item(),
    "linear_rel_err": ((out - ref).norm() / ref.norm()).item(),
}))
"""


def run_python(code: str, cap: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CAPS["avx2"]}  # "native" even inside CI's capped pass
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**env, **CAPS[cap]}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_test_model_is_bit_identical_under_every_instruction_set():
    digests = {cap: run_python(TINY_MODEL_DIGEST, cap) for cap in CAPS}
    assert digests["avx2"] == digests["native"] == digests["default"], digests


def test_config_hash_names_the_architecture_not_the_writer(tiny, tmp_path):
    """Re-saving a checkpoint with another transformers release (or other whitespace) keeps its identity."""
    import shutil

    base = load_model(tiny.hf_dir).config_hash
    resaved = tmp_path / "resaved"
    shutil.copytree(tiny.hf_dir, resaved)
    cfg = json.loads((resaved / "config.json").read_text())
    cfg.update(transformers_version="0.0.1", _name_or_path="/somewhere/else")
    (resaved / "config.json").write_text(json.dumps(cfg, indent=4, sort_keys=False))
    assert load_model(resaved).config_hash == base
    cfg["rms_norm_eps"] = 1e-6
    (resaved / "config.json").write_text(json.dumps(cfg))
    assert load_model(resaved).config_hash != base

    meta = load_model(tiny.meta_dir).config_hash
    moved = tmp_path / "meta"
    shutil.copytree(tiny.meta_dir, moved)
    (moved / "params.json").write_text(json.dumps(json.loads((moved / "params.json").read_text()), indent=2))
    assert load_model(moved).config_hash == meta


def test_bf16_paths_on_a_cpu_without_native_bf16():
    """oneDNN capped to AVX2: no bf16 packing, and bf16 matmuls still run (emulated) and are right."""
    capped = run_python(PROBES, "avx2")
    assert not capped["native_bf16"] and not capped["onednn_bf16"] and not capped["prepack_bf16"]
    assert capped["prepack_fp32"] and not capped["packed_bf16_linear"]
    assert capped["autocast_dtype"] == "torch.bfloat16"
    assert capped["autocast_rel_err"] < 2e-2 and capped["linear_rel_err"] < 2e-2, capped
    native = run_python(PROBES, "native")
    assert native["prepack_bf16"] == native["onednn_bf16"] == native["packed_bf16_linear"]
    assert native["autocast_rel_err"] < 2e-2 and native["linear_rel_err"] < 2e-2, native


def test_onednn_cap_parsing(monkeypatch):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for cap, allows_bf16 in (
        ("AVX2", False),
        ("avx512_core", False),
        ("AVX512_CORE_BF16", True),
        ("AVX512_CORE_AMX", True),
        ("ALL", True),
        ("", True),
    ):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert onednn_allows("AVX512_CORE_BF16") is allows_bf16, cap
        assert onednn_allows("AVX2") is True, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "SSE41")
    assert not onednn_allows("AVX2")


def test_gpu_with_only_emulated_bf16_gets_fp16_and_no_autocast(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on V100 / T4 (emulated bf16): the stages pick fp16 / fp32 there."""
    from llama_3.checkpoints import default_dtype
    from pipeline.core.runtime import capture_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    cuda = torch.device("cuda")
    assert capture_dtype(cuda) == torch.float16
    assert default_dtype(cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100 / H100
    assert capture_dtype(cuda) == torch.bfloat16 and default_dtype(cuda) == torch.bfloat16


def test_onednn_caches_stay_bounded_over_many_batch_shapes(tiny):
    """Length-sorted batches come in hundreds of shapes; oneDNN caches a primitive per shape (1,024 by default,
    each with its scratchpad). With the fast paths applied, 200 more shapes grow malloc's live bytes by little
    (was ~200 MB on the tiny model: top sentences' memory grew with the corpus)."""
    code = """
import ctypes, sys, torch
from llama_3 import load_model
from llama_3.cpu_fast import apply_cpu_fast_paths
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
lm = load_model(sys.argv[1], dtype=torch.float32)
assert apply_cpu_fast_paths(lm.model) > 0
used = []
with torch.inference_mode():
    for i in range(300):
        lm.model.capture(torch.randint(0, 100, (1 + i % 50, 8 + i // 2)), ["resid_pre.1"])
        if i in (99, 299):
            used.append(libc.mallinfo2().uordblks / 2**20)
print(used[1] - used[0])
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("mallinfo2 is glibc's")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny.hf_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 40, f"{done.stdout.split()[-1]} MB more after 200 more batch shapes"
