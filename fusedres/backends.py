"""Backend choice for every fused op, in one place.

Backends: ``native`` (the compiled extension ``fusedres._C``: its CUDA kernels on a GPU, its C++
CPU kernels on the CPU), ``triton``, ``reference`` (plain PyTorch), and ``auto``: per op, shape,
dtype and device, the fastest of the usable candidates, timed once and cached. ``cudnn``: cuDNN
graphs (``fusedres._cudnn_C``, fusedres/ops/cudnn.py) for the convolutions, on CUDA devices. A
requested backend that cannot take a case falls back along ``cudnn -> native -> triton ->
reference`` with a one-time warning naming the reason. ``cuda`` is the old name of ``native``
(deprecated).

Train mode (``resolve_train``) chooses per block shape among whole-block plans: each compiled
backend with the fused backward convs or with ATen's GEMMs between the fused BN kernels, and
the block's eager (unfused) forward, timed forward + backward once; a fused plan replaces eager
only where it is clearly faster (``EAGER_MARGIN``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from fusedres import _extension

BACKENDS = ("auto", "native", "cudnn", "triton", "reference")
_FALLBACK_ORDER = ("cudnn", "native", "triton", "reference")
# Old names, accepted with a deprecation warning for one release.
_ALIASES = {"cuda": "native"}
_SUPPORTED_DTYPES = {
    "native": (torch.float32, torch.float16, torch.bfloat16),
    "cudnn": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}

_default_backend = os.environ.get("FUSEDRES_BACKEND", "auto")
_warned: set[tuple[str, str]] = set()
_auto_choice: dict[tuple, str] = {}


def check_backend(name: str) -> str:
    """``name`` as a current backend name (an old alias warns once and maps to its new name)."""
    if name in _ALIASES:
        new = _ALIASES[name]
        if ("alias", name) not in _warned:
            _warned.add(("alias", name))
            warnings.warn(f"fusedres: backend {name!r} is now called {new!r}; the old name will be removed "
                          "in the next release", FutureWarning, stacklevel=3)
        return new
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def kernels_of(backend: str, device: torch.device) -> str:
    """What actually runs for ``backend`` on ``device``, for logs, warnings and test ids."""
    if backend == "native":
        return "fusedres._C CUDA kernels" if device.type == "cuda" else "fusedres._C C++ CPU kernels"
    if backend == "triton":
        return "Triton kernels" + ("" if device.type == "cuda" else " (interpreter)")
    if backend == "cudnn":
        return "cuDNN graphs (fusedres._cudnn_C)"
    return {"reference": "unfused PyTorch ops", EAGER: "the eager (unfused) block",
            # What eval blocks run on the CPU under auto (fusedres.nn.plan, fusedres.ops.onednn).
            "onednn": "prepacked oneDNN convolutions with fused post-ops, torch.ops.mkldnn",
            "winograd": "Winograd F(2x2, 3x3) convolutions with fused epilogue, fusedres._C",
            }.get(backend, backend)


def set_default_backend(name: str) -> None:
    """Backend used by modules and ops that do not name one (initially ``$FUSEDRES_BACKEND`` or auto)."""
    global _default_backend
    _default_backend = check_backend(name)


def get_default_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def default_backend(name: str) -> Iterator[None]:
    """Temporarily change the default backend: ``with fusedres.default_backend("triton"): ...``."""
    previous = get_default_backend()
    set_default_backend(name)
    try:
        yield
    finally:
        set_default_backend(previous)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache  # an import attempt costs microseconds: once per process
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def unusable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on this device and dtype, or None if it can."""
    if backend == "reference":
        return None
    if dtype not in _SUPPORTED_DTYPES[backend]:
        return f"the {backend} kernels do not support {dtype}"
    if backend == "cudnn":
        from fusedres.ops import cudnn  # knows its build and what it needs (per case: at the call)

        return cudnn.unusable_reason(device)
    if backend == "native":
        if not _extension.loaded():
            return f"fusedres._C is not loaded ({_extension.LOAD_ERROR})"
        if device.type == "cuda" and not _extension.with_cuda_kernels():
            return f"fusedres._C was built without its CUDA kernels ({_extension.cuda_build_note()})"
        if device.type not in ("cpu", "cuda"):
            return f"no kernels for device type {device.type!r}"
        return None
    if not _triton_importable():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreted():
        return None
    return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU), got {device.type}"


def _warn_once(requested: str, used: str, reason: str, device: torch.device) -> None:
    key = (requested, reason)
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(f"fusedres: backend {requested!r} falls back to {used!r} ({kernels_of(used, device)}): {reason}",
                  stacklevel=3)


def _fallback(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    start = _FALLBACK_ORDER.index(requested)
    first_reason = None
    for candidate in _FALLBACK_ORDER[start:]:
        reason = unusable_reason(candidate, device, dtype)
        if reason is None:
            if first_reason is not None:
                _warn_once(requested, candidate, first_reason, device)
            return candidate
        first_reason = first_reason or reason
    raise AssertionError("the reference backend is always usable")


def auto_candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends ``auto`` times for this device: compiled kernels first, the reference last.

    The Triton interpreter is a test vehicle, never a candidate on the CPU. Nor is the reference
    in fp16/bf16 on the CPU where a compiled backend runs: timing calls eager's reduced-precision
    CPU convolution, which has taken the process down (segfault, fp16 x (1, 1, 4, 1), 1x1 weight,
    stride 2, padding (0, 1), dilation 2), and a candidate must never do that.
    """
    names = ["native", "cudnn", "triton"] if device.type == "cuda" else ["native"]
    usable = [n for n in names if unusable_reason(n, device, dtype) is None]
    if usable and device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return usable
    return usable + ["reference"]


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_candidates(run: Callable[[object], object], candidates: Sequence, device: torch.device,
                    repeats: int = 5) -> dict:
    """Median seconds of ``run(c)`` per candidate after one warm-up call each (Triton compiles,
    the allocator fills). The candidates are timed round-robin, so drift in clocks or load
    during the measurement hits all of them alike."""
    for c in candidates:
        run(c)
    times: dict = {c: [] for c in candidates}
    for _ in range(repeats):
        for c in candidates:
            times[c].append(_seconds(lambda: run(c), device))
    return {c: sorted(t)[len(t) // 2] for c, t in times.items()}


def capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream: timing (events, a sync) must not run."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_named_choice: dict[tuple, str] = {}


def resolve_named(requested: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """The concrete backend when ``requested`` (None: the default) names one, after the fallback
    chain (its warning once); None for ``auto``. A usable backend named by its current name is
    a dict lookup after the first call, so callers resolve this first and build ``auto``'s tune
    key only when it is None."""
    name = requested or _default_backend
    key = (name, device.type, dtype)
    chosen = _named_choice.get(key)
    if chosen is None:
        name = check_backend(name)
        if name == "auto":
            return None
        chosen = _fallback(name, device, dtype)
        if chosen == key[0]:  # no alias, no fallback: nothing to warn about on later calls
            _named_choice[key] = chosen
    return chosen


def resolve(
    requested: str | None,
    device: torch.device,
    dtype: torch.dtype,
    tune_key: tuple | None = None,
    run: Callable[[str], object] | None = None,
) -> str:
    """The concrete backend for one call.

    ``requested`` None means the default. For ``auto``, ``tune_key`` (op, shapes, flags) and
    ``run(backend)`` let the first call of each key time every candidate; later calls reuse the
    winner. Under ``torch.compile`` nothing is timed: the cached winner, else the first candidate.
    """
    named = resolve_named(requested, device, dtype)
    if named is not None:
        return named
    candidates = auto_candidates(device, dtype)
    if tune_key is None or run is None or len(candidates) == 1:
        return candidates[0]
    key = (tune_key, device.type, dtype)
    if key in _auto_choice:
        return _auto_choice[key]
    if torch.compiler.is_compiling() or capturing(device):
        return candidates[0]
    with torch.no_grad():
        timings = time_candidates(run, candidates, device)
    _auto_choice[key] = min(timings, key=timings.__getitem__)
    return _auto_choice[key]


EAGER = "eager"  # a train plan: the block's unfused torchvision forward
# How much faster than the eager block a train plan must time to be chosen. A block timed alone
# runs with its weights and activations hot in cache; inside a model it does not, and the gain
# shrinks (CPU, ResNet-50 layer4 at batch 2: 8% faster alone, 5% slower in the model).
EAGER_MARGIN = 0.10


def train_candidates(device: torch.device, dtype: torch.dtype) -> list:
    """Train plans ``auto`` times: ``(backend, fused_backward)`` per usable compiled backend,
    fused backward first, then the eager block (the Triton interpreter is never a candidate)."""
    names = ["native", "cudnn", "triton"] if device.type == "cuda" else ["native"]
    usable = [n for n in names if unusable_reason(n, device, dtype) is None]
    return [(n, fused) for n in usable for fused in (True, False)] + [EAGER]


def resolve_train(
    requested: str | None,
    device: torch.device,
    dtype: torch.dtype,
    tune_key: tuple | None = None,
    run: Callable[[object], object] | None = None,
):
    """The train plan of one block call: ``(backend, fused_backward)`` or ``EAGER``.

    A named backend means its fused ops with the fused backward convs (after the fallback chain);
    the reference backend is the plain-PyTorch spelling of the same plan. For ``auto``,
    ``run(plan)`` runs forward + backward of the block on a throwaway copy; the first call of each
    ``tune_key`` times every candidate and later calls reuse the winner, which must beat the
    eager block by ``EAGER_MARGIN`` (else eager it is). Without ``run`` (e.g.
    synchronized BN, where ranks must not diverge), under ``torch.compile`` or when nothing was
    timed, the first candidate.
    """
    name = check_backend(requested or _default_backend)
    if name != "auto":
        return (_fallback(name, device, dtype), True)
    candidates = train_candidates(device, dtype)
    key = ("train", tune_key, device.type, dtype)
    if key in _auto_choice:
        return _auto_choice[key]
    if tune_key is None or run is None or torch.compiler.is_compiling() or capturing(device):
        return candidates[0]
    with torch.enable_grad():
        timings = time_candidates(run, candidates, device, repeats=7)
    fastest = min(timings, key=timings.__getitem__)
    # A fused plan must beat the eager block clearly (EAGER_MARGIN) to replace it.
    if timings[fastest] > (1 - EAGER_MARGIN) * timings[EAGER]:
        fastest = EAGER
    _auto_choice[key] = fastest
    return _auto_choice[key]


def tensor_key(tensors: Sequence[torch.Tensor | None]) -> tuple:
    """Shapes and layouts that decide which backend is fastest (part of ``auto``'s cache key)."""
    return tuple(
        None if t is None else (tuple(t.shape), t.is_contiguous(memory_format=torch.channels_last))
        for t in tensors
    )
