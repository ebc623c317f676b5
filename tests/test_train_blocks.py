"""Train mode: fused blocks give torchvision's outputs, gradients and running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet

import fusedres
from tests.conftest import (
    DTYPES,
    TRAIN_GRAD_VS_SAME_DTYPE,
    TRAIN_GRAD_VS_TRUTH,
    assert_fused_ran,
    assert_matches_reference,
    fused_backends,
    fused_ops,
    normwise_error,
    randomize_batchnorm,
)

CL = torch.channels_last
BACKENDS = fused_backends("cpu") + ["reference"]

# (block class, inplanes, planes, stride, projection)
BLOCKS = {
    "basic_identity": (resnet.BasicBlock, 8, 8, 1, False),
    "basic_projection_stride2": (resnet.BasicBlock, 8, 16, 2, True),
    "bottleneck_identity": (resnet.Bottleneck, 16, 4, 1, False),
    "bottleneck_projection_stride1": (resnet.Bottleneck, 8, 4, 1, True),
    "bottleneck_projection_stride2": (resnet.Bottleneck, 16, 8, 2, True),
}


def make_block(name: str) -> nn.Module:
    cls, inplanes, planes, stride, projection = BLOCKS[name]
    downsample = None
    if projection:
        out = planes * cls.expansion
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    block = cls(inplanes, planes, stride, downsample)
    randomize_batchnorm(block)
    return block.train()


def _sgd_steps(block: nn.Module, xs: list[torch.Tensor], grads: list[torch.Tensor]):
    """One SGD step per input; returns the first step's output and gradients."""
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    first = None
    for x, g in zip(xs, grads):
        opt.zero_grad()
        x = x.detach().requires_grad_()
        out = block(x)
        out.backward(g)
        if first is None:
            first = (out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()})
        opt.step()
    return first


def _run(block: nn.Module, name: str, dtype: torch.dtype, steps: int, backend: str | None = None):
    """SGD steps on fixed inputs (seeded per call) for ``block`` converted to ``dtype``."""
    net = copy.deepcopy(block).to(dtype)
    if backend is not None:
        net = fusedres.convert(net, backend=backend)
    generator = torch.Generator().manual_seed(7)
    inplanes = BLOCKS[name][1]
    xs = [torch.randn(2, inplanes, 9, 9, generator=generator).contiguous(memory_format=CL) for _ in range(steps)]
    out_shape = copy.deepcopy(block)(xs[0]).shape  # on a copy: a forward updates running stats
    gs = [torch.randn(out_shape, generator=generator) for _ in range(steps)]
    with fused_ops() as log:
        out, dx, dparams = _sgd_steps(net, [x.to(dtype) for x in xs], [g.to(dtype) for g in gs])
    if backend in ("native", "triton"):
        assert_fused_ran(log, backend)
    return out, {"x": dx, **dparams}, dict(net.named_buffers())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_block_matches_torchvision(backend, name, dtype):
    """Outputs, gradients of x, conv weights, gamma and beta, and the running statistics."""
    if backend == "triton" and dtype != torch.float32 and name != "bottleneck_projection_stride2":
        pytest.skip("interpreter time: the Triton kernels' dtypes are covered by tests/test_train_ops.py")
    tv = make_block(name)
    # fp32 takes 3 steps; reduced precision one: after more, the running statistics mostly
    # measure how far two low-precision SGD trajectories drifted apart.
    steps = 3 if dtype == torch.float32 else 1
    out, grads, buffers = _run(tv, name, dtype, steps, backend)
    out_t, grads_t, buffers_t = _run(tv, name, torch.float64, steps)
    out_b, grads_b, buffers_b = _run(tv, name, dtype, steps)
    assert_matches_reference(out, out_t, dtype, out_b, what="output")
    for bname, buf in buffers_t.items():
        if bname.endswith("num_batches_tracked"):
            assert torch.equal(buffers[bname], buf), bname
        else:
            assert_matches_reference(buffers[bname], buf, dtype, buffers_b[bname], what=f"{bname} after {steps} step(s)")
    if dtype == torch.float32:
        for what, grad in grads.items():
            assert_matches_reference(grad, grads_t[what], dtype, grads_b[what], what=f"grad of {what}")
        return
    if backend == "reference":
        # Compared with itself this could not fail. Its formulas are held exact in fp32 above and
        # in float64 by gradcheck; in reduced precision its rounding points are the kernels', not
        # eager's (a flipped ReLU mask bit moves a whole entry), so against float64 it is held to
        # what catches a wrong formula.
        for what, grad in grads.items():
            err_truth = normwise_error(grad, grads_t[what])
            assert err_truth < TRAIN_GRAD_VS_TRUTH, f"grad of {what} vs float64: {err_truth:.3g}"
        return
    # Same rounding points: the fused kernels against the reference backend.
    _, grads_same, _ = _run(tv, name, dtype, steps, "reference")
    for what, grad in grads.items():
        err_same, err_truth = normwise_error(grad, grads_same[what]), normwise_error(grad, grads_t[what])
        assert err_same < TRAIN_GRAD_VS_SAME_DTYPE[dtype], f"grad of {what} vs reference backend: {err_same:.3g}"
        assert err_truth < TRAIN_GRAD_VS_TRUTH, f"grad of {what} vs float64: {err_truth:.3g}"


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_backward_strategies_match_torchvision(backend, name, monkeypatch):
    """Backward with ATen's GEMMs between the fused BN kernels (a plan ``auto`` may pick) gives
    the gradients the fused backward convs give, and torchvision's."""
    if backend == "triton" and name != "bottleneck_projection_stride2":
        pytest.skip("interpreter time: one Triton case")
    tv = make_block(name)
    results = {}
    for fused_backward in (True, False):
        monkeypatch.setattr(fusedres.backends, "resolve_train", lambda *a, fb=fused_backward: (backend, fb))
        results[fused_backward] = _run(tv, name, torch.float32, 1, backend)
    truth = _run(tv, name, torch.float64, 1)
    for what, grad in results[False][1].items():
        assert_matches_reference(grad, truth[1][what], torch.float32, what=f"grad of {what} (ATen GEMMs)")
        assert_matches_reference(results[True][1][what], truth[1][what], torch.float32, what=f"grad of {what} (fused)")


def test_auto_train_times_once_on_a_copy(monkeypatch):
    """``auto`` in train mode times every plan once per block shape, on a copy: the block's own
    running statistics advance by one step and its parameters get no gradient from the timing."""
    monkeypatch.setattr(fusedres.backends, "_auto_choice", {})
    timed = []
    time_candidates = fusedres.backends.time_candidates

    def record(run, candidates, device, repeats=5):
        timed.extend(candidates)
        return time_candidates(run, candidates, device, repeats)

    monkeypatch.setattr(fusedres.backends, "time_candidates", record)
    tv = make_block("bottleneck_projection_stride2")
    fused = fusedres.convert(copy.deepcopy(tv), backend="auto")
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=CL)
    out = fused(x)
    candidates = fusedres.backends.train_candidates(x.device, x.dtype)
    assert len(timed) == len(candidates) and fusedres.backends.EAGER in candidates
    (choice,) = fusedres.backends._auto_choice.values()
    assert choice in candidates
    assert all(p.grad is None for p in fused.parameters())
    assert_matches_reference(out, tv(x).double(), torch.float32, what="output")
    for (name, a), b in zip(tv.named_buffers(), fused.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), name
    fused(x)
    assert len(timed) == len(candidates), "a second call of the same shape timed again"


@pytest.mark.parametrize("speedup,expect_fused", [(1.05, False), (1.25, True)], ids=["within_margin", "clear_win"])
def test_auto_train_keeps_eager_unless_a_plan_clearly_wins(monkeypatch, speedup, expect_fused):
    monkeypatch.setattr(fusedres.backends, "_auto_choice", {})
    candidates = fusedres.backends.train_candidates(torch.device("cpu"), torch.float32)
    fused_plan = candidates[0]

    def fake_timings(run, cands, device, repeats=5):
        return {c: (1.0 / speedup if c == fused_plan else 1.0) for c in cands}

    monkeypatch.setattr(fusedres.backends, "time_candidates", fake_timings)
    choice = fusedres.backends.resolve_train("auto", torch.device("cpu"), torch.float32, ("key",), lambda plan: None)
    assert choice == (fused_plan if expect_fused else fusedres.backends.EAGER)


@pytest.mark.parametrize("momentum,track", [(None, True), (0.3, True), (0.1, False)],
                         ids=["cumulative_average", "momentum_0.3", "no_running_stats"])
def test_batchnorm_options(momentum, track):
    tv = resnet.BasicBlock(4, 4, norm_layer=lambda c: nn.BatchNorm2d(c, momentum=momentum, track_running_stats=track))
    fused = fusedres.convert(copy.deepcopy(tv), backend=fused_backends("cpu")[0])
    for step in range(3):
        x = torch.randn(2, 4, 6, 6)
        assert_matches_reference(fused(x), tv(x).double(), torch.float32, what=f"step {step}")
    tv.eval(), fused.eval()  # without running stats, eval still normalises with batch statistics
    x = torch.randn(2, 4, 6, 6)
    assert_matches_reference(fused(x), tv(x).double(), torch.float32, what="eval")
    for (name, a), b in zip(tv.named_buffers(), fused.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("backend", ["reference"] + [b for b in fused_backends("cpu") if b == "triton"])
def test_train_block_gradcheck_float64(backend):
    """The hand-written train backward against finite differences, for x and every parameter."""
    downsample = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    tv = resnet.Bottleneck(4, 2, 2, downsample)
    randomize_batchnorm(tv)
    block = fusedres.convert(tv.double().train(), backend=backend)
    names = [n for n, _ in block.named_parameters()]
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    leaves = [x] + [p.detach().clone().requires_grad_() for p in block.parameters()]

    def fn(x, *params):  # running statistics change on every call but never enter the output
        return torch.func.functional_call(block, dict(zip(names, params)), (x,))

    # The interpreter is slow: Triton gets gradcheck's fast mode (random projections of the Jacobian).
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, fast_mode=backend == "triton")


def test_resnet50_train_step_matches_torchvision():
    """Loss and every parameter gradient of one train step on 2x3x64x64 after convert()."""
    model = torchvision.models.resnet50()
    randomize_batchnorm(model)
    x, target = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    results = {}
    fused = fusedres.convert(copy.deepcopy(model), backend=fused_backends("cpu")[0])
    for label, net, inp in (("fused", fused, x),
                            ("eager", copy.deepcopy(model), x),
                            ("truth", copy.deepcopy(model).double(), x.double())):
        loss = nn.functional.cross_entropy(net.train()(inp), target)
        loss.backward()
        results[label] = (loss.detach(), {n: p.grad for n, p in net.named_parameters()})
    loss, grads = results["fused"]
    loss_e, grads_e = results["eager"]
    loss_t, grads_t = results["truth"]
    assert_matches_reference(loss.reshape(1), loss_t.reshape(1), torch.float32, what="loss")
    # layer4 normalises over 2x2x2 = 8 values per channel: its BN backward amplifies fp32
    # rounding, so eager fp32 is itself ~1e-2 from float64; hold fusedres to eager's error.
    for name, grad in grads.items():
        err, err_eager = normwise_error(grad, grads_t[name]), normwise_error(grads_e[name], grads_t[name])
        assert err <= max(1e-4, 3 * err_eager), f"grad of {name}: {err:.3g} (eager fp32: {err_eager:.3g})"


def test_train_saves_less_than_eager():
    """Saved-for-backward bytes of a Bottleneck in train mode, fused vs torchvision."""
    def saved_bytes(block, x):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        return total

    tv = make_block("bottleneck_projection_stride2")
    fused = fusedres.convert(copy.deepcopy(tv), backend=fused_backends("cpu")[0])
    x = torch.randn(4, 16, 16, 16, requires_grad=True)
    eager, ours = saved_bytes(tv, x), saved_bytes(fused, x)
    assert ours < 0.6 * eager, (ours, eager)


def _ops_run(fn) -> list[tuple[str, int]]:
    """(op name, largest output numel) of every op ``fn`` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = out if isinstance(out, (tuple, list)) else [out]
            calls.append((str(func.overloadpacket), max([t.numel() for t in flat if isinstance(t, torch.Tensor)] or [0])))
            return out

    with Log():
        fn()
    return calls


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_train_bottleneck_launches(backend):
    """DESIGN.md §2: a projection Bottleneck's train forward is 5 main launches (4 conv+stats, one
    BN+add+ReLU), its backward one ``conv_bn_backward`` per conv; every other op touches
    per-channel vectors only, but for the one add that joins the two input-gradient paths."""
    block = fusedres.convert(make_block("bottleneck_projection_stride2"), backend=backend)
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=CL).requires_grad_()
    channels = 4 * 32  # (4, K) coefficient rows of the widest BN
    out = None

    def forward():
        nonlocal out
        out = block(x)

    forward_ops = _ops_run(forward)
    grad = torch.randn_like(out)
    backward_ops = _ops_run(lambda: out.backward(grad))

    def fused(ops):
        return sorted(name.split(".")[1] for name, _ in ops if name.startswith("fusedres."))

    def large_aten(ops):  # detach is a view (what autograd saves), not a launch
        return [name for name, numel in ops
                if not name.startswith("fusedres.") and name != "aten.detach" and numel > channels]

    suffix = "_triton" if backend == "triton" else ""
    assert fused(forward_ops) == sorted([f"conv_bn_stats{suffix}"] * 4 + [f"bn_finalize{suffix}"] * 4 + [f"bn_add_act{suffix}"])
    assert large_aten(forward_ops) == []
    assert fused(backward_ops) == sorted([f"conv_bn_backward{suffix}"] * 4 + [f"bn_act_backward{suffix}"]
                                         + [f"bn_backward_reduce{suffix}"] * 2)
    assert large_aten(backward_ops) == ["aten.add"], large_aten(backward_ops)


def test_auto_train_with_frozen_parameters_under_no_grad(monkeypatch):
    """Train-mode BN with every parameter frozen (statistics-only updates): auto's timing runs
    have nothing to backpropagate and must still work; the statistics advance once."""
    monkeypatch.setattr(fusedres.backends, "_auto_choice", {})
    tv = make_block("bottleneck_identity")
    for p in tv.parameters():
        p.requires_grad_(False)
    fused = fusedres.convert(copy.deepcopy(tv), backend="auto")
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        out = fused(x)
    assert_matches_reference(out, tv(x).double(), torch.float32, what="output")
    for (name, a), b in zip(tv.named_buffers(), fused.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), name
