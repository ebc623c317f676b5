"""The ``cudnn`` backend's Python side: loading ``fusedres._cudnn_C``, planning cuDNN graphs with
or without a GPU, and running the ``fusedres::*_cudnn`` ops with a fallback for what cuDNN does
not offer.

The graphs (csrc/cudnn/cudnn_graphs.cpp) are the fusions of NVIDIA's MLPerf ResNet:

- ``conv_bn_act``: conv -> scale -> shift [-> + residual] [-> ReLU] (eval, BN folded)
- ``conv_bn_stats``: [relu(x*scale+shift) ->] conv -> genstats (train forward)
- ``bn_finalize``: sums -> BN scale/shift, saved statistics, running statistics
- ``wgrad``: wgrad(dy, [relu(x*scale+shift)]) (the prologue recomputed)
- ``dgrad``: dgrad(dy, w) [-> dReLU -> the previous BN's backward sums]

Without a GPU, ``cudnnCreate`` fails, but the frontend plans for a GPU it cannot see from that
GPU's serialized ``DeviceProperties``: :func:`plan` with ``device_properties`` runs validation,
heuristics, ``check_support`` and plan building on the CPU. Graphs only served by engines that
are compiled at run time report ``needs_runtime_compilation`` there (no libcuda): "cannot tell
here", not "unsupported".
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.machinery
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusedres import _extension

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# The start of the error a fusedres::*_cudnn kernel raises for a case cuDNN does not offer
# (kNotOffered in csrc/cudnn/cudnn_glue.cpp): the caller falls back instead of failing.
NOT_OFFERED = "fusedres cudnn: not offered:"
OPS = ("conv_bn_act", "conv_bn_stats", "bn_finalize", "conv_bn_backward")
STATUSES = ("planned", "needs_runtime_compilation", "unsupported", "invalid", "error")
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _load() -> tuple[object | None, ctypes.CDLL | None, str | None]:
    """(the module, its C planning functions, why not loaded)."""
    files = sorted(p for suffix in importlib.machinery.EXTENSION_SUFFIXES
                   for p in PACKAGE_DIR.glob(f"_cudnn_C{suffix}"))
    if not files:
        return None, None, f"fusedres._cudnn_C is not built ({build_note() or 'see setup.py'})"
    if not _extension.loaded():
        return None, None, "fusedres._C (which declares the cudnn ops) is not loaded"
    try:
        module = importlib.import_module("fusedres._cudnn_C")
    except ImportError as exc:
        return None, None, f"{files[0]} failed to load ({type(exc).__name__}: {exc})"
    lib = ctypes.CDLL(module.__file__)
    lib.fusedres_cudnn_plan_json.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]
    lib.fusedres_cudnn_plan_json.restype = ctypes.c_int64
    lib.fusedres_cudnn_runtime_info.argtypes = [ctypes.c_char_p, ctypes.c_int64]
    lib.fusedres_cudnn_runtime_info.restype = ctypes.c_int64
    lib.fusedres_cudnn_cache_size.restype = ctypes.c_int64
    return module, lib, None


def build_note() -> str:
    """Why the build left the cuDNN backend out, as setup.py recorded it ("" if it did not)."""
    try:
        from fusedres import _build_info
    except ImportError:
        return ""
    return getattr(_build_info, "CUDNN_NOTE", "")


_module, _lib, LOAD_ERROR = _load()


def loaded() -> bool:
    return _module is not None


def unusable_reason(device: torch.device) -> str | None:
    """Why the ``cudnn`` backend cannot run on ``device`` at all (per-case limits come later)."""
    if device.type != "cuda":
        return f"cuDNN graphs need a CUDA device, got {device.type}"
    if not loaded():
        return LOAD_ERROR
    return None


def _call_c(fn, *args) -> str:
    size = 1 << 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = fn(*args, buf, size)
        text = buf.value.decode()
        if n < 0:
            raise ValueError(text)
        if n < size:
            return text
        size = n + 1


def runtime_info() -> str:
    """cudnn-frontend and cuDNN versions (or why no libcudnn could be loaded)."""
    if not loaded():
        return f"not loaded: {LOAD_ERROR}"
    return _call_c(_lib.fusedres_cudnn_runtime_info)


def cache_size() -> int:
    """Graphs built so far in this process (planned or not: failures are cached too)."""
    return int(_lib.fusedres_cudnn_cache_size()) if loaded() else 0


@dataclass(frozen=True)
class DeviceProperties:
    """A GPU to plan for without it: cudnn-frontend's ``DeviceProperties`` serialization."""

    name: str
    json_text: str
    sm_version: int
    sm_count: int

    @classmethod
    def from_file(cls, path: str | Path) -> "DeviceProperties":
        text = Path(path).read_text()
        props = json.loads(text)
        return cls(props["deviceName"], text, props["deviceVer"] // 10, props["multiProcessorCount"])


@dataclass(frozen=True)
class Graph:
    """One cuDNN graph to plan: a pattern and the shapes it runs on (NCHW sizes; strides dense
    channels_last unless given)."""

    pattern: str
    x: tuple[int, ...] = ()
    w: tuple[int, ...] = ()
    prologue: bool = False
    residual: bool = False
    relu: bool = True
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    channels: int = 0
    strides: dict = field(default_factory=dict, compare=False, hash=False)

    def request(self, dtype: torch.dtype, allow_tf32: bool) -> dict:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        req = {"pattern": self.pattern, "dtype": DTYPES[dtype], "prologue": self.prologue,
               "residual": self.residual, "relu": self.relu, "allow_tf32": allow_tf32,
               "conv_stride": list(self.stride), "padding": list(self.padding),
               "dilation": list(self.dilation), "channels": self.channels}
        for name, dims in (("x", self.x), ("w", self.w)):
            if dims:
                req[name] = {"dim": list(dims)}
                if name in self.strides:
                    req[name]["stride"] = list(self.strides[name])
        return req


def plan(graph: Graph, dtype: torch.dtype, properties: DeviceProperties | None = None,
         device: int | None = None, allow_tf32: bool = False) -> dict:
    """Builds (once per key, then from the cache) and plans ``graph`` for the GPU ``properties``
    describes (no GPU needed) or for CUDA device ``device``.

    Returns cuDNN's verdict: ``status`` (one of ``STATUSES``), ``validated``, ``num_plans``,
    ``workspace`` (bytes), the failing ``stage`` and cuDNN's ``message``, the cached graph's
    ``graph_id`` and whether this call was a ``cache_hit``.
    """
    if not loaded():
        raise RuntimeError(f"the cuDNN backend is not available: {LOAD_ERROR}")
    req = graph.request(dtype, allow_tf32)
    if properties is not None:
        req.update(device_properties=properties.json_text, sm_version=properties.sm_version,
                   sm_count=properties.sm_count)
    elif device is not None:
        req["device"] = device
    else:
        raise ValueError("plan needs device properties or a CUDA device index")
    return json.loads(_call_c(_lib.fusedres_cudnn_plan_json, json.dumps(req).encode()))


# --- the support table: every graph of the backend on ResNet-50's first 3x3 conv -----------------

def _resnet50_conv2(pattern: str, **flags) -> Graph:
    """ResNet-50's first 3x3 conv (layer1), batch 32, as ``pattern``."""
    return Graph(pattern, (32, 64, 56, 56), (64, 64, 3, 3), padding=(1, 1), **flags)


SUPPORT_GRAPHS: dict[str, Graph] = {
    "conv_bn_act (conv-scale-bias-relu)": _resnet50_conv2("conv_bn_act"),
    "conv_bn_act + residual": _resnet50_conv2("conv_bn_act", residual=True),
    "conv_bn_stats (conv-genstats)": _resnet50_conv2("conv_bn_stats"),
    "conv_bn_stats + BN-ReLU prologue": _resnet50_conv2("conv_bn_stats", prologue=True),
    "bn_finalize": Graph("bn_finalize", channels=64),
    "wgrad": _resnet50_conv2("wgrad"),
    "wgrad + BN-ReLU prologue": _resnet50_conv2("wgrad", prologue=True),
    "dgrad": _resnet50_conv2("dgrad"),
    "dgrad + dReLU + dBN sums": _resnet50_conv2("dgrad", prologue=True),
}


def stored_properties_dir() -> Path:
    """The device-property files kept with the tests (a source checkout)."""
    return PACKAGE_DIR.parent / "tests" / "data" / "cudnn-device-properties"


def support_table(properties: list[DeviceProperties],
                  dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)) -> list[dict]:
    """One row per (graph, dtype, arch): the status, plans and workspace, cuDNN's first reason."""
    rows = []
    for label, graph in SUPPORT_GRAPHS.items():
        for dtype in dtypes:
            for props in properties:
                r = plan(graph, dtype, props)
                rows.append({"graph": label, "dtype": DTYPES[dtype], "arch": f"sm{props.sm_version}",
                             "status": r["status"], "num_plans": r["num_plans"], "workspace": r["workspace"],
                             "reason": _reason(r)})
    return rows


def _reason(result: dict) -> str:
    """cuDNN's most telling line: the last 'Reason' given, else the first line."""
    lines = [ln for ln in result["message"].splitlines() if ln.strip()]
    reasons = [r for r in (ln.split("Reason:", 1)[1].strip() for ln in lines if "Reason:" in ln) if r]
    return reasons[-1] if reasons else (lines[0] if lines else "")


def format_support_table(rows: list[dict]) -> str:
    """A Markdown table: graph x dtype, one column per arch."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        text = {"planned": f"planned ({r['num_plans']} plans)",
                "needs_runtime_compilation": "needs run-time compilation"}.get(r["status"], r["status"])
        cells.setdefault((r["graph"], r["dtype"]), {})[r["arch"]] = text
    out = ["| graph | dtype | " + " | ".join(archs) + " |", "|---|---|" + "---|" * len(archs)]
    for (graph, dtype), by_arch in cells.items():
        out.append(f"| {graph} | {dtype} | " + " | ".join(by_arch.get(a, "") for a in archs) + " |")
    return "\n".join(out)


def status_lines() -> str:
    """For ``python -m fusedres info``: whether the backend is built, and which fp16 graphs the
    local cuDNN plans (on this GPU, else against the stored sm80/sm90 properties)."""
    if not loaded():
        return f"fusedres._cudnn_C (cudnn backend): NOT LOADED: {LOAD_ERROR}"
    lines = [f"fusedres._cudnn_C (cudnn backend): loaded; {runtime_info()}"]
    if torch.cuda.is_available():
        targets = [(f"GPU 0 (sm{''.join(map(str, torch.cuda.get_device_capability(0)))})", None, 0)]
    else:
        files = sorted(stored_properties_dir().glob("*.json"))
        targets = [(f"sm{p.sm_version} (stored properties)", p, None) for p in map(DeviceProperties.from_file, files)]
    for where, props, device in targets:
        results = {label: plan(g, torch.float16, props, device) for label, g in SUPPORT_GRAPHS.items()}
        planned = [label for label, r in results.items() if r["status"] == "planned"]
        later = sum(r["status"] == "needs_runtime_compilation" for r in results.values())
        lines.append(f"  fp16 graphs cuDNN plans for {where}: {len(planned)}/{len(results)} "
                     f"({', '.join(planned) or 'none'}); {later} need run-time compilation (a GPU decides)")
    return "\n".join(lines)


# --- running the ops ---------------------------------------------------------------------------------

_not_offered: dict[tuple, str] = {}
_warned: set[tuple[str, str]] = set()


def _case_key(name: str, args: tuple) -> tuple:
    """What decides whether cuDNN offers a case: shapes, strides, dtypes, devices, flags."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return (tuple(a.shape), a.stride(), a.dtype, a.device)
        if isinstance(a, (list, tuple)):
            return tuple(one(b) for b in a)
        return a
    return (name, torch.backends.cudnn.allow_tf32, *(one(a) for a in args))


def _run_fallback(name: str, args: tuple, reason: str, device: torch.device, dtype: torch.dtype):
    from fusedres import backends
    from fusedres.ops._dispatch import kernel_for

    backend = backends.resolve("native", device, dtype)
    key = (name, reason)
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(f"fusedres: backend 'cudnn' falls back to {backend!r} ({backends.kernels_of(backend, device)}) "
                      f"for {name}: {reason}", stacklevel=4)
    return kernel_for(name, backend)(*args)  # the caller validated the operands


def cudnn_op(name: str) -> Callable:
    """The registered op ``fusedres::<name>_cudnn``."""
    return getattr(torch.ops.fusedres, f"{name}_cudnn")


def op(name: str) -> Callable:
    """``name`` on cuDNN graphs, falling back (one warning per reason) where cuDNN does not offer
    a case: the first call of each case plans it, later calls of a case that fell back skip
    cuDNN. Under ``torch.compile`` the op is traced as is."""
    if name not in OPS:
        raise ValueError(f"the cudnn backend has no op {name!r}; it has {OPS}")

    def run(*args):
        if torch.compiler.is_compiling():
            return cudnn_op(name)(*args)
        first = args[0]
        # The case key costs microseconds: computed only once some case has fallen back.
        reason = _not_offered.get(_case_key(name, args)) if _not_offered else None
        if reason is None:
            try:
                return cudnn_op(name)(*args)
            except RuntimeError as exc:
                text = str(exc)
                if NOT_OFFERED not in text:
                    raise
                reason = text.split(NOT_OFFERED, 1)[1].strip().splitlines()[0]
                _not_offered[_case_key(name, args)] = reason
        return _run_fallback(name, args, reason, first.device, first.dtype)

    run.__name__ = f"{name}_cudnn"
    return run


def _register_fakes() -> None:
    """The cudnn ops share the schemas, hence the fake impls, of the native ops."""
    if not _extension.loaded() or not hasattr(torch.ops.fusedres, "conv_bn_act_cudnn"):
        return
    for name in OPS:
        fake = importlib.import_module(f"fusedres.ops.{name}")._fake
        torch.library.register_fake(f"fusedres::{name}_cudnn")(fake)


_register_fakes()
