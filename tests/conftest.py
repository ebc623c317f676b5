"""Shared fixtures: seeding, the dtype tolerance table, NaN-poisoned outputs, backend lists."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter; set before any Triton kernel loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedres  # noqa: E402
from fusedres import backends  # noqa: E402

# Error budget by dtype, as max|actual - expected| / max|expected| against a float64 reference.
# For reduced precision the fused result must also be within LOWP_FACTOR of what plain PyTorch
# in the same dtype gets (see assert_matches_reference).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    # fp32 convs on TF32 tensor cores (cuDNN's default, and the CUDA kernels' with allow_tf32):
    # operands rounded to 10 mantissa bits, like fp16's, accumulated in fp32. fp32-exact is
    # tested with TF32 off against the torch.float32 entry.
    "tf32": 2e-3,
}
LOWP_FACTOR = 2.0
# Train-mode gradients in reduced precision, as ||actual - expected|| / ||expected||. At test-sized
# batches one rounding that flips a ReLU mask bit moves a whole gradient entry, so even eager
# PyTorch lands anywhere from 1e-3 to 0.25 from the float64 truth. The kernels are therefore held
# to the reference backend in the same dtype (same rounding points), and to the float64 truth
# only loosely (a wrong formula lands near 1).
TRAIN_GRAD_VS_SAME_DTYPE = {torch.float16: 0.05, torch.bfloat16: 0.1}
TRAIN_GRAD_VS_TRUTH = 0.5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def device_params() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def fused_backends(device: str) -> list[str]:
    """Concrete fused backends that can run on ``device`` here."""
    dev = torch.device(device)
    return [b for b in ("native", "triton") if backends.unusable_reason(b, dev, torch.float32) is None]


@pytest.fixture(autouse=True)
def _seed_and_skip_cuda(request):
    torch.manual_seed(1234)
    if request.node.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible")
    if "device" in getattr(request, "fixturenames", ()) and request.node.callspec.params.get("device") == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU; none is visible")


@pytest.fixture
def poison_outputs():
    """Every torch.empty (and at::empty in the extension) is filled with NaN while active, so an
    element a kernel forgets to write fails the comparison."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.double() - expected).abs().max() / scale).item()


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def assert_matches_reference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    baseline: torch.Tensor | None = None,
    what: str = "output",
) -> None:
    """``expected`` is computed in float64; ``baseline`` is plain PyTorch in ``dtype``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any() or expected.isnan().any(), f"{what}: NaN in the result (unwritten element?)"
    err = relative_error(actual, expected)
    budget = TOLERANCE[dtype]
    if baseline is not None and dtype in (torch.float16, torch.bfloat16):
        budget = max(budget, LOWP_FACTOR * relative_error(baseline, expected))
    assert err <= budget, f"{what}: relative error {err:.3g} exceeds {budget:.3g} for {dtype}"


def randomize_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)) or type(m).__name__ == "FrozenBatchNorm2d":
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


class _FusedOpLog:
    """Counts of the ``torch.ops.fusedres`` ops dispatched (C++ and Triton custom ops alike)."""

    def __init__(self) -> None:
        import collections

        self.counts: collections.Counter = collections.Counter()

    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def fused_ops():
    """``with fused_ops() as log: ...`` records every fusedres op dispatched inside, by name
    (``conv_bn_stats``, ``bn_finalize_triton``, ...): the proof that the fused kernels ran, since
    a fallback to unfused math only warns."""
    from torch.utils._python_dispatch import TorchDispatchMode

    log = _FusedOpLog()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            namespace, _, name = str(func.overloadpacket).partition(".")
            if namespace == "fusedres":
                log.counts[name] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        yield log


def assert_fused_ran(log: _FusedOpLog, backend: str) -> None:
    """Every op recorded in ``log`` belongs to ``backend``, and there was at least one."""
    assert log.total() > 0, f"no fusedres op ran on backend {backend!r} (an unfused fallback?)"
    triton = {name for name in log.counts if name.endswith("_triton")}
    expected = set(log.counts) if backend == "triton" else set()
    assert triton == expected, f"backend {backend!r} ran {dict(log.counts)}"


def run_isolated(code: str, timeout: float = 300.0) -> str:
    """Runs ``code`` in a fresh interpreter and returns its stdout; a crash (segfault, abort on
    heap corruption) or a timeout fails the calling test instead of taking pytest down. glibc's
    malloc checker is preloaded where available, so heap corruption aborts at once."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    debug = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
    if os.path.exists(debug) and "LD_PRELOAD" not in env:
        env.update(LD_PRELOAD=debug, MALLOC_CHECK_="3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (
        f"subprocess exited with {proc.returncode}" + (f" (signal {-proc.returncode})" if proc.returncode < 0 else "")
        + f"\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout
