"""What the bench suites share: settings, competitors, input rotation, timing, reference checks,
roofline figures and run metadata.

A suite file (bench/bench_<x>.py) uses this API, which is kept stable for new suites:

- ``pytest_generate_tests`` calls ``parametrize(metafunc, cases, modes, competitors(settings))``:
  case x mode x dtype x competitor, competitor fastest, so the competitors of one case run as
  consecutive test items (``case_key`` names the case of an item).
- ``cached_case(build)`` wraps ``build(case_name, mode, dtype_name, settings) -> Case`` (or an
  object holding one): the competitors of a case share its inputs (``Rotation``) and reference
  (``Expected``); building the next case frees the last one and resets ``torch.compile``.
- Each test calls ``skip_reason(competitor, device, dtype)``, builds its callable (e.g.
  ``module_for(competitor, module)``) and calls ``run(benchmark, config, case, competitor, call,
  outputs=None)``. ``run`` checks the outputs against the reference, warms the call up and
  registers it with the case as ``case.entries[competitor]`` (an ``Entry``); it does not time it.
  Until the case is timed a suite may add figures to ``entry.info`` (they become the row's
  ``extra_info``), e.g. a compile time.
- Timing is deferred: after the case's last test item (bench/conftest.py's
  ``pytest_runtest_teardown`` calls ``finish_case``), every registered competitor is timed
  round-robin, in ``Settings.rounds`` rounds of a short burst of calls each, the order rotating
  every round, so drift in clocks or machine load hits every competitor alike. Each round gives
  one sample (time per call); a row's figures are the median and quartiles of its samples. The
  samples go to pytest-benchmark's statistics and JSON, the figures to ``extra_info`` and the
  closing summary (bench/report.py).

Timing. On CUDA a burst's calls run back to back with no synchronisation in
between (launch latency hides behind queued work, as inside a network), bracketed by CUDA events,
each on the next of several input copies that together exceed twice the L2, so no call finds its
input in the cache. On the CPU a burst is timed by the wall clock.

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
from dataclasses import dataclass, field
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
FUSEDRES_BACKENDS = ("native", "cudnn", "triton", "auto")

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
    timed_s: float  # each competitor's timed calls take about this long in all
    rounds: int  # round-robin rounds: one sample per competitor each
    max_calls: int  # calls in one competitor's burst of a round, at most


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
            timed_s=0.05 if quick else 0.5,
            rounds=7 if quick else 15,
            max_calls=10 if quick else 100,
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
    """'native', 'triton' or 'auto' for a fusedres competitor, None for the others."""
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
    """``torch.compile`` as the competitor names it (``cached_case`` drops earlier cases' graphs,
    so no case runs into the recompile limit and silently falls back to eager)."""
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


# Peak figures of the project's performance method; on the project's lent machines an 8192^3
# bf16 matmul ran at ~790-800 TFLOP/s on both, and a device-to-device copy moved ~3.0 TB/s
# (H100) and ~4.3 TB/s (H200).
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


def _warm_up(call: Callable, inputs: Rotation, settings: Settings) -> float:
    """Runs ``call`` until compiles, autotuning, cudnn.benchmark's search and the allocator have
    settled; returns the seconds of one synchronised call after that."""
    sync = torch.cuda.synchronize if settings.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    warm_calls = 0
    while warm_calls < 2 or time.perf_counter() - start < settings.warmup_s:
        call(*inputs.next())
        sync()
        warm_calls += 1
    start = time.perf_counter()
    call(*inputs.next())
    sync()
    return max(time.perf_counter() - start, 1e-6)


@dataclass
class Entry:
    """A competitor of a case, checked and warmed up, waiting to be timed with the others."""

    competitor: str
    call: Callable
    benchmark: object  # pytest-benchmark's fixture of the competitor's test
    stats: object  # and its statistics, which finish_case fills
    info: dict  # extra_info known before timing
    calls_per_round: int
    samples_ms: list[float]


def _bursts(entries: list[Entry], inputs: Rotation, settings: Settings) -> None:
    """``settings.rounds`` rounds; in each, every entry runs a burst of its calls, in an order
    rotated by one each round; appends one time per call to each entry's samples."""
    cuda = settings.device.type == "cuda"
    pending = []
    for r in range(settings.rounds):
        shift = r % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(entry.calls_per_round):
                    entry.call(*inputs.next())
                end.record()
                pending.append((entry, begin, end))
            else:
                start = time.perf_counter()
                for _ in range(entry.calls_per_round):
                    entry.call(*inputs.next())
                entry.samples_ms.append((time.perf_counter() - start) * 1e3 / entry.calls_per_round)
    if cuda:
        torch.cuda.synchronize()
        for entry, begin, end in pending:
            entry.samples_ms.append(begin.elapsed_time(end) / entry.calls_per_round)


def quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, median, q3


# --- one case --------------------------------------------------------------------------------


@dataclass
class Case:
    """One comparison: every competitor of a case runs on the same inputs against the same
    reference, is timed round-robin with the others, and the report puts their rows together."""

    suite: str  # "ops", "blocks" or "models"
    mode: str  # e.g. "eval", "fwd+bwd", "train", "inference", "training"
    label: str
    dtype: torch.dtype
    batch: int
    inference: bool  # run under no_grad, and torch.compile with freezing
    inputs: Rotation
    expected: Expected
    work: Work
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"{self.suite} | {self.mode} | {DTYPE_NAMES[self.dtype]} | {self.label}"


_PENDING = pytest.StashKey[Case]()


@contextlib.contextmanager
def _case_context(case: Case, compiled: bool):
    """no_grad for inference cases, and inductor's freezing where torch.compile compiles them."""
    with contextlib.ExitStack() as stack:
        if case.inference:
            stack.enter_context(torch.no_grad())
            if compiled:
                import torch._inductor.config as inductor_config

                stack.enter_context(inductor_config.patch(freezing=True))
        yield


def _claim(benchmark):
    """pytest-benchmark's statistics for this test, filled in later by ``finish_case`` (the
    fixture cannot time calls interleaved with other tests' calls itself)."""
    benchmark._mode = "fusedres round-robin (bench/_harness.py)"
    return benchmark._make_stats(1)


def run(benchmark, config: pytest.Config, case: Case, competitor: str, call: Callable,
        outputs: Callable | None = None) -> None:
    """Checks ``competitor`` once against the reference, warms ``call`` up and registers it with
    ``case``; ``finish_case`` times it with the case's other competitors.

    ``call(*inputs)`` is what is timed; ``outputs(*inputs)`` gives the tensors to check when they
    are not what ``call`` returns (a training step returns only its loss).
    """
    bench_settings = settings(config)
    pending = config.stash.get(_PENDING, None)
    if pending is not None and pending is not case:
        finish_case(config)
    config.stash[_PENDING] = case
    benchmark.group = case.group
    with _case_context(case, competitor.startswith("compile")):
        got = as_tuple((outputs or call)(*case.inputs.first))
        error = max_error(got, case.expected.outputs)
        budget = case.expected.budget(case.dtype)
        del got
        if not error <= budget:  # also catches NaN
            pytest.fail(f"{competitor} on {case.group}: relative max error {error:.3g} exceeds {budget:.3g} "
                        f"(eager PyTorch: {case.expected.eager_error:.3g})")
        per_call_s = _warm_up(call, case.inputs, bench_settings)
        peak_mem_mb = _peak_extra_memory_mb(call, case.inputs) if bench_settings.device.type == "cuda" else None
    calls = min(bench_settings.max_calls,
                max(1, math.ceil(bench_settings.timed_s / bench_settings.rounds / per_call_s)))
    info = {
        "suite": case.suite,
        "mode": case.mode,
        "case": case.label,
        "dtype": DTYPE_NAMES[case.dtype],
        "competitor": competitor,
        "batch": case.batch,
        "input_copies": len(case.inputs.sets),
        "peak_mem_mb": peak_mem_mb,
        "max_rel_error": error,
        "error_budget": budget,
    }
    case.entries[competitor] = Entry(competitor, call, benchmark, _claim(benchmark), info, calls, [])


def finish_case(config: pytest.Config) -> None:
    """Times the competitors registered with the pending case round-robin and records their rows
    (pytest-benchmark statistics and ``extra_info``, and the closing summary's rows)."""
    case = config.stash.get(_PENDING, None)
    if case is None:
        return
    del config.stash[_PENDING]
    entries = list(case.entries.values())
    case.entries.clear()
    if not entries:
        return
    bench_settings = settings(config)
    with _case_context(case, any(e.competitor.startswith("compile") for e in entries)):
        # One interleaved pass first: every competitor's caches and plans settle with all of them alive.
        for entry in entries:
            entry.call(*case.inputs.next())
        _bursts(entries, case.inputs, bench_settings)
    cuda = bench_settings.device.type == "cuda"
    for entry in entries:
        q1, median, q3 = quartiles(entry.samples_ms)
        for ms in entry.samples_ms:
            entry.stats.update(ms / 1e3)
        info = {
            **entry.info,
            "median_ms": median,
            "q1_ms": q1,
            "q3_ms": q3,
            "spread": (q3 - q1) / median,  # IQR / median
            "samples_ms": entry.samples_ms,
            "clock": "cuda-events" if cuda else "wall",
            "rounds": len(entry.samples_ms),
            "calls_per_round": entry.calls_per_round,
            "calls": len(entry.samples_ms) * entry.calls_per_round,
            **figures(case.work, median, bench_settings.device, case.dtype),
        }
        entry.benchmark.extra_info.update(info)
        config.stash.setdefault(RESULTS, []).append({"group": case.group, "name": entry.benchmark.name,
                                                     "extra_info": info})


def case_key(item: pytest.Item | None) -> tuple | None:
    """Which case a test item belongs to: its module and parameters but the competitor."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "competitor" not in callspec.params:
        return None
    params = tuple(sorted((k, str(v)) for k, v in callspec.params.items() if k != "competitor"))
    return (item.module.__name__ if item.module else None, params)


def cached_case(build: Callable[..., Case]) -> Callable[..., Case]:
    """Keeps the last case built: the competitors of one case run one after another and share
    its inputs and reference; the next case frees them and drops torch.compile's graphs."""
    last: dict[tuple, Case] = {}

    def get(*key) -> Case:
        if key not in last:
            last.clear()
            torch.compiler.reset()
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
        extension = ("CPU and CUDA kernels" if _extension.with_cuda_kernels()
                     else f"CPU kernels only (CUDA kernels not built: {_extension.cuda_build_note()})")
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
