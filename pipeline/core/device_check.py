"""What a CUDA / NCCL run enforces, checked on a CPU: device discipline and collectives, for CPU CI.

No CI machine has a GPU, so a CPU tensor meeting a CUDA one, a collective fed a CPU tensor under NCCL, or a
rank that runs one collective fewer than the others would first fail on the users' 8-GPU run. Two switches,
read from the environment by `install_from_env()` (tests/device_check/sitecustomize.py calls it at interpreter
start, so every stage and every torchrun rank a test launches gets them):

    PIPELINE_DEVICE_CHECK=cuda     "cuda" is emulated on the CPU. Tensors made for it (`.to("cuda")`, `.cuda()`,
                                   a factory with device="cuda", anything computed from them) are `CudaTensor`s:
                                   CPU data whose `.device` says cuda:N. An op that mixes one with a CPU tensor
                                   raises as CUDA would (CPU 0-dim scalars, CPU index tensors and `copy_` across
                                   devices pass, as on CUDA); `.numpy()` of one raises. torch.cuda answers as a
                                   GPU machine would (is_available, set_device, Event, Stream: no-ops), so the
                                   stages' CUDA-only branches (pinned copies, events, NCCL) run.
    PIPELINE_COLLECTIVE_LOG=DIR    every torch.distributed collective is checked against NCCL's rules (tensors on
                                   the rank's device — CUDA under the emulation —, contiguous, an NCCL dtype, the
                                   same shape and dtype in and out; `torch.cuda.set_device` before an object
                                   collective) and appended (op, shapes, dtypes) to DIR/collectives-r{rank}.jsonl;
                                   `rank_sequences(DIR)` reads them back for a test to compare across ranks.

What it cannot see: numerics (kernels are the CPU's), real asynchrony (events and streams are no-ops, so a
missing synchronisation is invisible), memory (use bench/gpu_smoke.sh), and NCCL's own hangs beyond a
mismatched sequence.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

DEVICE_ENV = "PIPELINE_DEVICE_CHECK"
COLLECTIVE_ENV = "PIPELINE_COLLECTIVE_LOG"

_state = types.SimpleNamespace(device_index=None, emulating=False, log_dir=None)


class DeviceMismatch(RuntimeError):
    """A CPU tensor met a (emulated) CUDA tensor where CUDA would refuse it."""


class CollectiveMismatch(RuntimeError):
    """A collective NCCL would refuse."""


# ---- the emulated device ---------------------------------------------------------------------------------------
# An op's plain-tensor arguments that CUDA accepts beside device tensors: (op name, argument positions).
_CPU_OK_ARGS = {
    "aten.index.Tensor": (1,),  # x[cpu_indices] on CUDA moves the indices
    "aten.index_put.default": (1,),
    "aten.index_put_.default": (1,),
    "aten._index_put_impl_.default": (1,),
    "aten.copy_.default": (1,),  # cross-device copies are the point of copy_
}


class CudaTensor(torch.Tensor):
    """CPU data that reports an (emulated) CUDA device. Its C++ device stays CPU, so the CPU kernels and autograd
    run it; Python code sees `.device.type == "cuda"`."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int):
        assert type(elem) is torch.Tensor or isinstance(elem, torch.nn.Parameter), type(elem)
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=elem.device,
            layout=elem.layout,
            requires_grad=elem.requires_grad,
        )
        r.elem, r.index = elem, index
        return r

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", self.index)

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def __repr__(self) -> str:
        return f"CudaTensor(cuda:{self.index}, {self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


# Plain tensors that are on the device all the same: sparse results of device tensors (the SAE's CSR matmuls; a
# wrapper subclass cannot hold a sparse layout) and their values() / indices (autograd tracks those as views of
# the sparse tensor, and a wrapper of them breaks at its first view() for want of the base's strides).
_plain_on_device = WeakTensorKeyDictionary()
_SPARSE_PARTS = ("aten.values.default", "aten.crow_indices.default", "aten.col_indices.default")


def _device_index(t) -> int | None:
    if isinstance(t, CudaTensor):
        return t.index
    if isinstance(t, torch.Tensor):
        return _plain_on_device.get(t)
    return None


def _run(func, args, kwargs):
    """Run one aten op the way CUDA would: refuse CPU tensors beside device ones, compute on the CPU data, and
    put the results on the device."""
    name = str(func)
    index = _cuda_index(kwargs.get("device"))
    if index is not None:  # a factory: made on the CPU, placed on the device
        return _wrap(func(*args, **{**kwargs, "device": torch.device("cpu")}), index)
    indices = {i for i in map(_device_index, tree_leaves((args, kwargs))) if i is not None}
    if not indices:
        return func(*args, **kwargs)
    allowed = _CPU_OK_ARGS.get(name, ())
    leaves = [t for i, a in enumerate(args) if i not in allowed for t in tree_leaves(a)] + tree_leaves(kwargs)
    mixed = [t for t in leaves if isinstance(t, torch.Tensor) and _device_index(t) is None and t.dim() > 0]
    if mixed:
        shapes = ", ".join(str(tuple(t.shape)) for t in mixed[:3]) + (", ..." if len(mixed) > 3 else "")
        raise DeviceMismatch(
            f"{name}: cuda and cpu tensors in one op (cpu: {shapes}); CUDA raises 'Expected all tensors to be on "
            "the same device'"
        )
    if len(indices) > 1:
        raise DeviceMismatch(f"{name}: tensors on cuda:{sorted(indices)} in one op")
    a, k = tree_map(lambda t: t.elem if isinstance(t, CudaTensor) else t, (args, kwargs))
    out = func(*a, **k)
    # new_zeros(..., device="cpu") of a device tensor stays on the CPU; a sparse constructor's device= is the one
    # its binding read off the (wrapper's CPU) inputs
    if kwargs.get("device") is not None and "sparse" not in name:
        return out
    if name in _SPARSE_PARTS:
        _plain_on_device[out] = indices.pop()
        return out
    return _wrap(out, indices.pop())


def _cuda_index(device) -> int | None:
    """The CUDA index `device` names (None: not CUDA)."""
    if device is None or isinstance(device, (torch.dtype, torch.Tensor)):
        return None
    d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if d.type != "cuda":
        return None
    return d.index if d.index is not None else (_state.device_index or 0)


def _wrap(out, index: int):
    def place(t):
        if type(t) is not torch.Tensor:
            return t
        if t.layout != torch.strided:
            _plain_on_device[t] = index
            return t
        return CudaTensor(t, index)

    return tree_map(place, out)


def _move(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """t.to(device, dtype) between the CPU and the emulated device (a copy across, as on CUDA)."""
    on_device = isinstance(t, CudaTensor)
    target = _cuda_index(device)
    if (target is not None) == on_device and (not on_device or target == t.index):
        return t.to(dtype=dtype) if dtype is not None else t  # stays put: an ordinary (autograd-tracked) op
    base = t.elem if on_device else t
    moved = base.to(dtype=dtype) if dtype is not None else base
    if moved is base:
        moved = base.detach().clone()
    return CudaTensor(moved, target) if target is not None else moved


class EmulatedCuda(TorchFunctionMode):
    """Routes `.to` / `.cuda` / `.cpu` / `.pin_memory` / `torch.tensor(device=)` to CudaTensors (these check the
    device in their Python bindings, before any dispatch mode could see them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("to", "cuda", "cpu", "pin_memory", "is_pinned") and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            if name == "pin_memory":
                _require_thread_device("pin_memory()")
                return t  # pinned or not, the data is the same
            if name == "is_pinned":
                return not isinstance(t, CudaTensor)
            if name == "to":
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            elif name == "cuda":
                device, dtype = torch.device("cuda", args[1] if len(args) > 1 else _state.device_index or 0), None
            else:
                device, dtype = torch.device("cpu"), None
            return _move(t, device, dtype) if device is not None else func(*args, **kwargs)
        if name == "type_as" and isinstance(args[1], torch.Tensor):  # .type() strings know no emulated device
            return _move(args[0], args[1].device, args[1].dtype)
        if name == "tolist" and isinstance(args[0], CudaTensor):
            return args[0].elem.tolist()  # a host sync on CUDA, allowed
        index = _cuda_index(kwargs.get("device"))
        if index is not None and name in ("tensor", "as_tensor"):  # they check the device before dispatch
            return _wrap(func(*args, **{**kwargs, "device": "cpu"}), index)
        return func(*args, **kwargs)


class _DeviceOps(TorchDispatchMode):
    """Every aten op: factories with a CUDA `device=` (also those inside torch's own functions) make CudaTensors,
    and ops on device tensors run through _run (sparse ones included, which no subclass dispatch would see)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _Emulation:
    """Both modes, entered together (per thread: torch's modes are thread-local)."""

    def __enter__(self):
        self.modes = [EmulatedCuda(), _DeviceOps()]
        for m in self.modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)
        return False


def _require_thread_device(what: str) -> None:
    """CUDA calls on a thread use that thread's current device, cuda:0 until it calls set_device."""
    if threading.current_thread() is not threading.main_thread() and getattr(_thread_device, "index", None) is None:
        raise DeviceMismatch(
            f"{what} on a thread that never called torch.cuda.set_device: on a rank whose GPU is not cuda:0 "
            "this opens a CUDA context (~0.5 GB) on GPU 0"
        )


class _Event:
    """torch.cuda.Event on the emulated device: the work it would wait for has already run."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        _require_thread_device("a CUDA event synchronised")

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _Event()


_thread_device = threading.local()  # .index: what this thread's torch.cuda.set_device named


def _set_device(device) -> None:
    index = device if isinstance(device, int) else torch.device(device).index or 0
    _state.device_index = index
    _thread_device.index = index


def _generator_class():
    real = torch._C.Generator

    class Generator(real):
        """torch.Generator(device="cuda") on the emulated device: a CPU generator."""

        def __new__(cls, device="cpu"):
            return real("cpu" if _cuda_index(device) is not None else device)

    return Generator


def _no_grad_mode(mode: bool = True):
    return torch.no_grad() if mode else torch.enable_grad()


def emulate_cuda() -> None:
    """Make "cuda" a CPU-backed device for this process (every thread, from now on)."""
    if _state.emulating:
        return
    _state.emulating = True
    cuda = torch.cuda
    patches = {
        "_lazy_init": lambda: None,
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "device_count": lambda: 8,
        "set_device": _set_device,
        "current_device": lambda: _state.device_index or 0,
        "synchronize": lambda device=None: None,
        "is_bf16_supported": lambda including_emulation=True: True,
        "get_device_name": lambda device=None: "emulated CUDA device (pipeline/core/device_check.py)",
        "get_device_capability": lambda device=None: (9, 0),
        "Event": _Event,
        "Stream": _Stream,
        "current_stream": lambda device=None: _Stream(),
        "stream": lambda stream=None: contextlib.nullcontext(),
        "set_sync_debug_mode": lambda mode: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda device=None: None,
        "max_memory_allocated": lambda device=None: 0,
        "memory_allocated": lambda device=None: 0,
    }
    for name, value in patches.items():
        setattr(cuda, name, value)
    torch.Generator = _generator_class()  # type: ignore[misc]
    torch.Tensor.record_stream = lambda self, stream: None  # streams are no-ops here
    # Views of a wrapper subclass made under inference_mode fail ("Cannot set version_counter for inference
    # tensor"); no_grad is the same computation.
    torch.inference_mode = torch.autograd.inference_mode = _no_grad_mode  # type: ignore[misc, assignment]
    # Module.to(device) must make new Parameters (CudaTensors), not swap .data of the old CPU ones.
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    _Emulation().__enter__()  # this thread; threads started later enter it in _bootstrap_inner
    original = threading.Thread._bootstrap_inner

    def bootstrap_inner(self):
        with _Emulation():
            original(self)

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[method-assign]


# ---- collectives ---------------------------------------------------------------------------------------------
_NCCL_DTYPES = {
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
}
_TENSOR_OPS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",
)
_OBJECT_OPS = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")


def _check_tensor(op: str, t: torch.Tensor) -> None:
    expected = "cuda" if _state.emulating else "cpu"
    if t.device.type != expected:
        raise CollectiveMismatch(f"dist.{op}: a {t.device.type} tensor {tuple(t.shape)}; NCCL takes only {expected}")
    if not t.is_contiguous():
        raise CollectiveMismatch(f"dist.{op}: a non-contiguous tensor {tuple(t.shape)}; NCCL needs contiguous ones")
    if t.dtype not in _NCCL_DTYPES:
        raise CollectiveMismatch(f"dist.{op}: dtype {t.dtype} is not an NCCL type")


def _record(op: str, tensors: list[torch.Tensor]) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    row = {"op": op, "shapes": [list(t.shape) for t in tensors], "dtypes": [str(t.dtype) for t in tensors]}
    with open(Path(_state.log_dir) / f"collectives-r{rank}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _checked(op: str, real):
    def collective(*args, **kwargs):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if op in _OBJECT_OPS:
            if _state.emulating and getattr(_thread_device, "index", None) is None:
                raise CollectiveMismatch(
                    f"dist.{op} before torch.cuda.set_device: NCCL's object collectives stage the pickles on the "
                    "current device (cuda:0 on every rank without it)"
                )
            _record(op, [])
            return real(*args, **kwargs)
        for t in tensors:
            _check_tensor(op, t)
        if op in ("all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "gather"):
            if any(t.dtype != tensors[0].dtype for t in tensors):
                raise CollectiveMismatch(f"dist.{op}: mixed dtypes {[str(t.dtype) for t in tensors]}")
        _record(op, tensors)
        a, k = tree_map(lambda t: t.elem if isinstance(t, CudaTensor) else t, (args, kwargs))  # gloo takes CPU data
        return real(*a, **k)

    collective.__name__ = op
    collective.__wrapped__ = real  # type: ignore[attr-defined]
    return collective


def check_collectives(log_dir: str | Path) -> None:
    """Check and record every collective of this process in log_dir (see the module docstring)."""
    if _state.log_dir is not None:
        return
    _state.log_dir = str(log_dir)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    for op in (*_TENSOR_OPS, *_OBJECT_OPS, "barrier"):
        real = getattr(dist, op)
        if op == "barrier":

            def barrier(*args, _real=real, **kwargs):
                _record("barrier", [])
                return _real(*args, **kwargs)

            setattr(dist, op, barrier)
        else:
            setattr(dist, op, _checked(op, real))


def rank_sequences(log_dir: str | Path) -> dict[int, list[dict]]:
    """Each rank's recorded collectives, in order."""
    out = {}
    for p in sorted(Path(log_dir).glob("collectives-r*.jsonl")):
        out[int(p.stem.split("-r")[1])] = [json.loads(line) for line in p.read_text().splitlines()]
    return out


def emulated_backend() -> str | None:
    """The backend a process group takes under the emulation (gloo: NCCL needs a real GPU), else None."""
    return "gloo" if _state.emulating else None


def install_from_env() -> None:
    if os.environ.get(DEVICE_ENV) == "cuda":
        emulate_cuda()
    elif os.environ.get(DEVICE_ENV):
        raise ValueError(f"{DEVICE_ENV}={os.environ[DEVICE_ENV]!r}: the only emulated device is 'cuda'")
    if os.environ.get(COLLECTIVE_ENV):
        check_collectives(os.environ[COLLECTIVE_ENV])
