"""What this CPU, as ATen and oneDNN may use it, can do: the probes behind every dtype and kernel choice.

The hardware flags alone are not enough: `ONEDNN_MAX_CPU_ISA` (or `DNNL_MAX_CPU_ISA`) caps what
oneDNN may use, and CI runs the quick suite with it capped to AVX2 on any machine, so that a code
path that only works on AVX-512 shows up there. Every probe here answers for the capped library.

Measured (bench/bench_llama.py times the capture with and without prepacking on every run; README):
- fp32: the capture-only forward with oneDNN-prepacked weights runs ~2.3x `F.linear`'s on AMD EPYC
  (AVX-512; MKL's sgemm is slow there), 0.96-1.03x on Intel Xeon natively and capped to AVX2
  (run-to-run noise on that VM is larger): never worse beyond noise, so fp32 is packed on every CPU.
- bf16: without AVX-512 BF16 or AMX a bf16 matmul is emulated, ~7x slower than fp32 (24 vs 160
  GFLOP/s, Xeon capped to AVX2), and oneDNN refuses to pack bf16 weights at all without AVX-512 BW
  or AVX-NE-CONVERT; bf16 weights are packed only where oneDNN has a bf16 path.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch

# oneDNN's ISA names, lowest first (its `dnnl_cpu_isa_t`); an alias maps to the same rank.
_ONEDNN_ISA_ORDER = [
    ("SSE41",),
    ("AVX",),
    ("AVX2",),
    ("AVX2_VNNI",),
    ("AVX2_VNNI_2",),
    ("AVX512_CORE",),
    ("AVX512_CORE_VNNI",),
    ("AVX512_CORE_BF16",),
    ("AVX10_1_512", "AVX512_CORE_FP16"),
    ("AVX10_1_512_AMX", "AVX512_CORE_AMX"),
    ("AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"),
    ("AVX10_2_512",),
    ("AVX10_2_512_AMX_2",),
]
_ONEDNN_ISA_RANK = {name: rank for rank, names in enumerate(_ONEDNN_ISA_ORDER) for name in names}


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is capped to by the environment, or None (no cap: everything the CPU has)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return cap if cap and cap not in ("ALL", "DEFAULT") else None


def onednn_allows(isa: str) -> bool:
    """Whether the environment lets oneDNN use `isa` (the CPU may still lack it)."""
    cap = onednn_isa_cap()
    return cap is None or _ONEDNN_ISA_RANK.get(cap, len(_ONEDNN_ISA_ORDER)) >= _ONEDNN_ISA_RANK[isa]


def cuda_native_bf16() -> bool:
    """The GPU computes in bf16 itself (Ampere and later). torch.cuda.is_bf16_supported() also says yes on V100 / T4,
    where bf16 runs emulated at a fraction of fp16's speed."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


@functools.cache
def has_native_bf16() -> bool:
    """AVX-512 BF16 dot products or AMX tiles, usable by oneDNN: bf16 matmuls several times faster than fp32."""
    cpu = getattr(torch, "cpu", None)
    amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()) and onednn_allows("AVX10_1_512_AMX")
    avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()) and onednn_allows("AVX512_CORE_BF16")
    return (amx or avx512_bf16) and onednn_has_bf16()


@functools.cache
def onednn_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls and packs bf16 weights at all (AVX-512 BW or AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available():
        return False
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def missing_bf16_feature() -> str:
    """What to name in a message about bf16 on this CPU."""
    cap = onednn_isa_cap()
    if cap and not onednn_allows("AVX512_CORE_BF16"):
        return f"oneDNN is capped to {cap} by ONEDNN_MAX_CPU_ISA, below native bf16 (AVX-512 BF16 or AMX)"
    return "this CPU has no native bf16 (AVX-512 BF16 or AMX)"


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` go through oneDNN's prepacked linear on this CPU (see the module doc)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and onednn_has_bf16()


def has_native_fp16() -> bool:
    """AMX-FP16 tiles usable by oneDNN (the only CPU fp16 matmul torch runs natively)."""
    cpu = getattr(torch, "cpu", None)
    return bool(getattr(cpu, "_is_amx_fp16_supported", lambda: False)()) and onednn_allows("AVX10_1_512_AMX_FP16")


def warn_if_emulated(dtype: torch.dtype | None, device: torch.device, flag: str) -> bool:
    """One warning line when `flag` (e.g. "--model-dtype bfloat16") asks this CPU for half-precision
    matmuls it only emulates.

    The run goes on (the user may want bf16 to match a GPU run), on the slower path.
    """
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if dtype == torch.bfloat16 and has_native_bf16() or dtype == torch.float16 and has_native_fp16():
        return False
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    feature = missing_bf16_feature() if dtype == torch.bfloat16 else "this CPU has no native fp16 (AMX-FP16)"
    logging.getLogger("llama_3").warning(
        f"{flag}: {feature}; {name} matmuls run emulated, several times slower than float32"
    )
    return True


def cpu_name() -> str:
    """The CPU's model name and the instruction sets in use, for benchmark reports."""
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cap = onednn_isa_cap()
    isa = torch.backends.cpu.get_cpu_capability() + (f", oneDNN capped to {cap}" if cap else "")
    if os.environ.get("MKL_ENABLE_INSTRUCTIONS"):
        isa += f", MKL capped to {os.environ['MKL_ENABLE_INSTRUCTIONS']}"
    return f"{name} ({isa}{', native bf16' if has_native_bf16() else ''}, {torch.get_num_threads()} threads)"
