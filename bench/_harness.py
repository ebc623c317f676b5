"""What the bench suites share: settings, competitors, input rotation, timing, reference checks,
roofline figures and run metadata.

Timing (DESIGN.md §4). On CUDA every call is bracketed by CUDA events; after a warm-up the calls
run back to back with no synchronisation in between (launch latency hides behind queued work,
as inside a network), each on the next of several input copies that together exceed twice the
L2, so no call finds its input in the cache; the figure is the median. pytest-benchmark's own
rounds, synchronised after every call, give its wall-clock table; the CUDA-event median and the
figures derived from it go to ``benchmark.extra_info``. On the CPU the figure is the median of
those wall-clock rounds.

Correctness: before timing, each competitor's outputs on the first input copy are compared with
the unfused reference computed in float64 (CPU) or in float32 without TF32 (CUDA); the relative
max error must be within ``TOLERANCE`` for the dtype or a small multiple of eager PyTorch's own
error in that dtype, else the benchmark fails.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

import fusedres
from fusedres import _extension, backends

QUICK_ENV = "FUSEDRES_BENCH_QUICK"
COMMIT_ENV = "FUSEDRES_COMMIT"  # names the commit where the checkout has no .git (a copied tree)
REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FUSEDRES_BACKENDS = ("cuda", "triton", "auto")

# Relative max error vs the reference that any dtype may reach; low precision may also reach
# EAGER_FACTOR times what eager PyTorch gets in the same dtype (whole networks compound rounding).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
EAGER_FACTOR = 4.0

# Input copies are capped so tiny quick-mode inputs do not make thousands of them.
MAX_INPUT_COPIES = 1024

RESULTS = pytest.StashKey[list]()
_SETTINGS = pytest.StashKey["Settings"]()


@dataclass(frozen=True)
class Settings:
    """How this session benchmarks, from the command line (see bench/conftest.py)."""

    device: torch.device
    quick: bool
    batch: int
    image_size: int
    dtypes: tuple[str, ...]
    max_autotune: bool
    time_budget_s: float | None
    warmup_s: float
    timed_s: float  # the timed loop runs about this long
    min_calls: int
    max_calls: int
    wall_rounds: int  # pytest-benchmark's synchronised rounds on CUDA (on the CPU: all timed calls)


def settings(config: pytest.Config) -> Settings:
    if _SETTINGS not in config.stash:
        cuda = torch.cuda.is_available()
        quick = config.getoption("quick") or os.environ.get(QUICK_ENV) == "1"
        batch = config.getoption("bench_batch") or (2 if quick or not cuda else 128)
        config.stash[_SETTINGS] = Settings(
            device=torch.device("cuda" if cuda else "cpu"),
            quick=quick,
            batch=batch,
            image_size=56 if quick else 224,
            dtypes=("bf16", "fp16", "fp32") if cuda else ("fp32",),
            max_autotune=config.getoption("bench_max_autotune"),
            time_budget_s=config.getoption("bench_time_budget"),
            warmup_s=0.02 if quick else 0.1,
            timed_s=0.05 if quick else 0.3,
            min_calls=5 if quick else 10,
            max_calls=50 if quick else 1000,
            wall_rounds=5 if quick else 10,
        )
    return config.stash[_SETTINGS]


# --- competitors -----------------------------------------------------------------------------


def competitors(settings: Settings, with_cudnn_frontend: bool = False) -> list[str]:
    names = ["eager", "compile"]
    if settings.max_autotune:
        names.append("compile-max-autotune")
    if with_cudnn_frontend:
        names.append("cudnn-frontend")
    return names + [f"fusedres-{b}" for b in FUSEDRES_BACKENDS]


def fusedres_backend(competitor: str) -> str | None:
    """'cuda', 'triton' or 'auto' for a fusedres competitor, None for the others."""
    return competitor.removeprefix("fusedres-") if competitor.startswith("fusedres-") else None


def skip_reason(competitor: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``competitor`` cannot run here, or None."""
    if competitor == "cudnn-frontend":
        if device.type != "cuda":
            return "the cuDNN frontend needs a CUDA device"
        try:
            import cudnn  # noqa: F401
        except ImportError as exc:
            return f"the cuDNN frontend is not installed (pip install nvidia-cudnn-frontend): {exc}"
        return None
    backend = fusedres_backend(competitor)
    if backend is None or backend == "auto":
        return None
    if backend == "triton" and device.type != "cuda":
        return "Triton runs on the CPU only in its interpreter, a test vehicle: never benchmarked"
    return backends.unusable_reason(backend, device, dtype)


def parametrize(metafunc: pytest.Metafunc, cases: Sequence[str], modes: Sequence[str],
                competitor_names: Sequence[str]) -> None:
    """case x mode x dtype x competitor, competitor varying fastest so that the rows of one
    comparison run together and share their inputs and reference (see ``cached_case``)."""
    metafunc.parametrize("case_name", cases)
    metafunc.parametrize("mode", modes)
    metafunc.parametrize("dtype_name", settings(metafunc.config).dtypes)
    metafunc.parametrize("competitor", competitor_names)


def compile_module(module: torch.nn.Module, competitor: str) -> torch.nn.Module:
    """``torch.compile`` as the competitor names it, after dropping earlier cases' graphs (so no
    case runs into the recompile limit and silently falls back to eager)."""
    torch.compiler.reset()
    mode = "max-autotune" if competitor == "compile-max-autotune" else None
    return torch.compile(module, mode=mode, fullgraph=True)


def module_for(competitor: str, module: torch.nn.Module) -> torch.nn.Module:
    """A fresh copy of ``module`` as ``competitor`` runs it: eager, converted to a fusedres
    backend, or compiled."""
    module = copy.deepcopy(module)
    backend = fusedres_backend(competitor)
    if backend is not None:
        return fusedres.convert(module, backend=backend)
    return module if competitor == "eager" else compile_module(module, competitor)


# --- inputs ----------------------------------------------------------------------------------


def tensor_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and floating-point buffers (BN statistics)."""
    return tensor_bytes(list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()])


def l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


class Rotation:
    """Copies of one call's inputs, handed out in turn. On CUDA there are enough of them to fill
    twice the L2, so a call never reads inputs the previous calls left in the cache."""

    def __init__(self, make_inputs: Callable[[], tuple], device: torch.device):
        self.sets = [make_inputs()]
        copies = 1
        if device.type == "cuda":
            per_copy = max(tensor_bytes(self.sets[0]), 1)
            copies = min(MAX_INPUT_COPIES, max(2, math.ceil(2 * l2_bytes(device) / per_copy)))
        self.sets += [make_inputs() for _ in range(copies - 1)]
        self._index = 0

    @property
    def first(self) -> tuple:
        return self.sets[0]

    def next(self) -> tuple:
        inputs = self.sets[self._index]
        self._index = (self._index + 1) % len(self.sets)
        return inputs


# --- correctness -----------------------------------------------------------------------------


def reference_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


@contextlib.contextmanager
def reference_math():
    """cuDNN convolutions in true fp32 (no TF32) while the reference is computed."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|; NaN anywhere in ``actual`` gives NaN."""
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected).abs().max() / scale).item()


def max_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    return max(relative_error(a.detach(), e) for a, e in zip(actual, expected, strict=True))


@dataclass
class Expected:
    """The reference outputs on the first input copy and how far eager PyTorch lands from them."""

    outputs: tuple[torch.Tensor, ...]
    eager_error: float

    def budget(self, dtype: torch.dtype) -> float:
        return max(TOLERANCE[dtype], EAGER_FACTOR * self.eager_error)


def as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


# --- roofline --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What one call must do at least: FLOPs, bytes moved (each input read once, each output
    written once) and images (for images/s; None where a call is not about images)."""

    flops: float
    bytes: float
    images: int | None = None


@dataclass(frozen=True)
class Peak:
    tensor_flops: float  # bf16/fp16 dense, tensor cores
    tf32_flops: float  # fp32 convs with TF32 allowed (cuDNN's default)
    fp32_flops: float  # fp32 without tensor cores
    bytes_per_s: float


# DESIGN.md §4's figures; on the project's lent machines an 8192^3 bf16 matmul ran at ~790-800
# TFLOP/s on both, and a device-to-device copy moved ~3.0 TB/s (H100) and ~4.3 TB/s (H200).
PEAKS = {
    "H100": Peak(tensor_flops=800e12, tf32_flops=400e12, fp32_flops=60e12, bytes_per_s=3.0e12),
    "H200": Peak(tensor_flops=800e12, tf32_flops=400e12, fp32_flops=60e12, bytes_per_s=4.3e12),
}


def device_peak(device: torch.device) -> tuple[str, Peak] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((key, peak) for key, peak in PEAKS.items() if key in name), None)


def peak_flops(peak: Peak, dtype: torch.dtype) -> float:
    if dtype in (torch.bfloat16, torch.float16):
        return peak.tensor_flops
    return peak.tf32_flops if torch.backends.cudnn.allow_tf32 else peak.fp32_flops


def figures(work: Work, median_ms: float, device: torch.device, dtype: torch.dtype) -> dict:
    """Throughput, bandwidth and the roofline floor (None on devices without peak numbers)."""
    seconds = median_ms / 1e3
    result = {
        "flops": work.flops,
        "bytes": work.bytes,
        "tflops": work.flops / seconds / 1e12,
        "gbps": work.bytes / seconds / 1e9,
        "images_per_s": work.images / seconds if work.images else None,
        "floor_ms": None,
        "roofline_fraction": None,
    }
    found = device_peak(device)
    if found is not None:
        _, peak = found
        floor_ms = max(work.flops / peak_flops(peak, dtype), work.bytes / peak.bytes_per_s) * 1e3
        result["floor_ms"] = floor_ms
        result["roofline_fraction"] = floor_ms / median_ms
    return result


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    clock: str  # "cuda-events" or "wall"
    calls: int
    peak_mem_mb: float | None


def _peak_extra_memory_mb(call: Callable, inputs: Rotation) -> float:
    """Memory one call allocates at its peak beyond what was allocated before it (activations,
    workspaces, gradients): weights, optimizer state and the inputs that already exist are not
    counted, so competitors compare whatever else the session holds."""
    args = inputs.next()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(benchmark, call: Callable, inputs: Rotation, settings: Settings) -> Timing:
    cuda = settings.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # Warm-up: compiled kernels, autotuning, cudnn.benchmark's search and the allocator settle.
    # Synchronised, so the clock counts device time rather than launches queued ahead.
    start = time.perf_counter()
    warm_calls = 0
    while warm_calls < 2 or time.perf_counter() - start < settings.warmup_s:
        call(*inputs.next())
        sync()
        warm_calls += 1
    start = time.perf_counter()
    call(*inputs.next())
    sync()
    per_call_s = max(time.perf_counter() - start, 1e-6)
    calls = min(settings.max_calls, max(settings.min_calls, math.ceil(settings.timed_s / per_call_s)))

    event_ms = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(calls)]
        for begin, end in events:
            args = inputs.next()
            begin.record()
            call(*args)
            end.record()
        torch.cuda.synchronize()
        event_ms = [begin.elapsed_time(end) for begin, end in events]

    wall_ms = []

    def synchronized_call():
        args = inputs.next()
        begin = time.perf_counter()
        call(*args)
        sync()
        wall_ms.append((time.perf_counter() - begin) * 1e3)

    benchmark.pedantic(synchronized_call, rounds=settings.wall_rounds if cuda else calls)
    return Timing(
        median_ms=statistics.median(event_ms if cuda else wall_ms),
        clock="cuda-events" if cuda else "wall",
        calls=len(event_ms if cuda else wall_ms),
        peak_mem_mb=_peak_extra_memory_mb(call, inputs) if cuda else None,
    )


# --- one benchmark ---------------------------------------------------------------------------


@dataclass
class Case:
    """One comparison: every competitor of a case runs on the same inputs against the same
    reference, and the report puts their rows together."""

    suite: str  # "ops", "blocks" or "models"
    mode: str  # e.g. "eval", "fwd+bwd", "train", "inference", "training"
    label: str
    dtype: torch.dtype
    batch: int
    inference: bool  # run under no_grad, and torch.compile with freezing
    inputs: Rotation
    expected: Expected
    work: Work

    @property
    def group(self) -> str:
        return f"{self.suite} | {self.mode} | {DTYPE_NAMES[self.dtype]} | {self.label}"


def run(benchmark, config: pytest.Config, case: Case, competitor: str, call: Callable,
        outputs: Callable | None = None) -> None:
    """Checks ``competitor`` once against the reference, times ``call`` and records the figures.

    ``call(*inputs)`` is what is timed; ``outputs(*inputs)`` gives the tensors to check when they
    are not what ``call`` returns (a training step returns only its loss).
    """
    bench_settings = settings(config)
    benchmark.group = case.group
    with contextlib.ExitStack() as stack:
        if case.inference:
            stack.enter_context(torch.no_grad())
            if competitor.startswith("compile"):
                import torch._inductor.config as inductor_config

                stack.enter_context(inductor_config.patch(freezing=True))
        got = as_tuple((outputs or call)(*case.inputs.first))
        error = max_error(got, case.expected.outputs)
        budget = case.expected.budget(case.dtype)
        del got
        if not error <= budget:  # also catches NaN
            pytest.fail(f"{competitor} on {case.group}: relative max error {error:.3g} exceeds {budget:.3g} "
                        f"(eager PyTorch: {case.expected.eager_error:.3g})")
        timing = measure(benchmark, call, case.inputs, bench_settings)

    info = {
        "suite": case.suite,
        "mode": case.mode,
        "case": case.label,
        "dtype": DTYPE_NAMES[case.dtype],
        "competitor": competitor,
        "batch": case.batch,
        "median_ms": timing.median_ms,
        "clock": timing.clock,
        "calls": timing.calls,
        "input_copies": len(case.inputs.sets),
        "peak_mem_mb": timing.peak_mem_mb,
        "max_rel_error": error,
        "error_budget": budget,
        **figures(case.work, timing.median_ms, bench_settings.device, case.dtype),
    }
    benchmark.extra_info.update(info)
    config.stash.setdefault(RESULTS, []).append({"group": case.group, "name": benchmark.name, "extra_info": info})


def cached_case(build: Callable[..., Case]) -> Callable[..., Case]:
    """Keeps the last case built: the competitors of one case run one after another and share
    its inputs and reference; the next case frees them."""
    last: dict[tuple, Case] = {}

    def get(*key) -> Case:
        if key not in last:
            last.clear()
            last[key] = build(*key)
        return last[key]

    return get


# --- metadata --------------------------------------------------------------------------------


def git_commit() -> str | None:
    """HEAD of the checkout (with '-dirty' for uncommitted changes), else $FUSEDRES_COMMIT."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(COMMIT_ENV)
    return head + ("-dirty" if dirty else "")


def run_metadata(settings: Settings) -> dict:
    """What a later reader needs to trust or redo the numbers."""
    cuda = settings.device.type == "cuda"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if not _extension.loaded():
        extension = f"not loaded: {_extension.LOAD_ERROR}"
    else:
        extension = "CPU and CUDA kernels" if _extension.with_cuda_kernels() else "CPU kernels only"
    found = device_peak(settings.device)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": settings.device.type,
        "gpu": torch.cuda.get_device_name(settings.device) if cuda else None,
        "gpu_l2_mb": l2_bytes(settings.device) / 2**20 if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
        "fusedres_extension": extension,
        "quick": settings.quick,
        "batch": settings.batch,
        "image_size": settings.image_size,
        "dtypes": list(settings.dtypes),
        "clock": "CUDA events" if cuda else "wall clock",
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_conv_tf32": torch.backends.cudnn.allow_tf32,
        "roofline_peaks": None if found is None else {"device": found[0], **vars(found[1])},
    }
