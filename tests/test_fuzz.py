"""Bounded differential fuzz: every op and block, eval and train, every backend that runs here,
against a float64 oracle written independently of ``fusedres.ops._ref``.

Hypothesis draws shapes, strides, paddings, dilations, groups, dtypes and memory layouts
(NCHW, channels_last, non-contiguous views). Each (target, backend) pair runs its examples in a
child interpreter (``python -m tests.test_fuzz TARGET BACKEND N``), so a segfault or heap
corruption fails that test with the last case printed instead of taking pytest down.

Budget: derandomized (a fixed seed per target), ``FUZZ_EXAMPLES`` below in CI (about three
minutes on 2 cores, most of it the Triton interpreter); ``FUSEDRES_FUZZ_SCALE=10`` (or any factor) for a larger run on demand.
Small shapes for the Triton interpreter.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

SCALE = float(os.environ.get("FUSEDRES_FUZZ_SCALE", "1"))
# (target, backend) -> examples per CI run.
FUZZ_EXAMPLES = {
    ("conv_bn_act", "native"): 40,
    ("conv_bn_act", "triton"): 8,
    ("conv_bn_act", "reference"): 20,
    ("conv_bn_act", "auto"): 10,
    ("block_eval", "native"): 10,
    ("block_eval", "triton"): 2,
    ("block_eval", "reference"): 6,
    ("block_train", "native"): 15,
    ("block_train", "triton"): 2,
    ("block_train", "reference"): 6,
    ("block_train", "auto"): 3,
}
# Reduced precision: within this factor of eager PyTorch's own error in the same dtype.
LOWP_FACTOR = 2.0
# Train-mode blocks normalise over as few as 2 values per channel, where BN backward amplifies
# rounding; fusedres in fp32 is held to eager fp32's own distance from float64 (DESIGN.md §3).
TRAIN_FACTOR = 3.0


# ----------------------------------------------------------------------------- pytest side


def _usable(backend: str) -> bool:
    if backend in ("reference", "auto"):
        return True
    from fusedres import backends

    return backends.unusable_reason(backend, torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize("target,backend", list(FUZZ_EXAMPLES), ids=lambda v: v)
def test_fuzz(target, backend):
    from tests.conftest import run_isolated

    if not _usable(backend):
        pytest.skip(f"backend {backend!r} cannot run here")
    examples = max(1, round(FUZZ_EXAMPLES[target, backend] * SCALE))
    out = run_isolated(
        f"import sys; from tests.test_fuzz import main; sys.exit(main({target!r}, {backend!r}, {examples}))",
        timeout=max(600.0, 60.0 * examples),
    )
    assert f"fuzz {target} {backend}: {examples} examples passed" in out, out[-3000:]


# ----------------------------------------------------------------------------- child side


def _relative(actual: torch.Tensor, expected: torch.Tensor, normwise: bool = False) -> float:
    """max|a - e| / max|e|, or ||a - e|| / ||e|| (``normwise``)."""
    expected = expected.double()
    if expected.numel() == 0:
        return 0.0
    if normwise:
        return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.double() - expected).abs().max() / scale).item()


def _check(what: str, actual, expected, dtype, baseline=None, factor: float = LOWP_FACTOR, compute=None,
           normwise: bool = False) -> None:
    """``actual`` against the float64 ``expected``: within the budget of the dtype it was computed
    in (``compute``, default ``dtype``), or within ``factor`` of eager's own error in that dtype
    (``baseline``) where that is larger."""
    from tests.conftest import TOLERANCE

    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    bad = actual.isnan() & ~expected.isnan()
    assert not bad.any(), f"{what}: NaN where the oracle has none"
    err = _relative(actual, expected, normwise)
    budget = TOLERANCE[compute or dtype]
    if baseline is not None:
        budget = max(budget, factor * _relative(baseline, expected, normwise))
    assert err <= budget, f"{what}: relative error {err:.3g} exceeds {budget:.3g} ({dtype})"


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout: NCHW, channels_last, or a strided view."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # every other element of a twice-as-wide buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _conv_case(draw, backend: str):
    from hypothesis import strategies as st

    small = backend == "triton"
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if backend in ("triton", "reference"):
        dtypes.append(torch.float64)
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 2 if small else 4))
    k = groups * draw(st.integers(1, 2 if small else 4))
    r, s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    lo_h = max(1, dilation[0] * (r - 1) + 1 - 2 * padding[0])
    lo_w = max(1, dilation[1] * (s - 1) + 1 - 2 * padding[1])
    h = draw(st.integers(lo_h, lo_h + (4 if small else 7)))
    w = draw(st.integers(lo_w, lo_w + (4 if small else 7)))
    n = draw(st.integers(1, 2 if small else 3))
    return dict(
        n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride=stride, padding=padding, dilation=dilation, groups=groups,
        dtype=draw(st.sampled_from(dtypes)),
        x_layout=draw(st.sampled_from(["nchw", "channels_last", "strided"])),
        w_layout=draw(st.sampled_from(["nchw", "channels_last", "odd"])),
        scale=draw(st.booleans()), shift=draw(st.booleans()),
        residual=draw(st.sampled_from([None, "full", "option_a"])),
        relu=draw(st.booleans()),
        grad=draw(st.booleans()),
    )


def _odd_weight(w: torch.Tensor) -> torch.Tensor:
    """Same values in (K, R, C, S) memory order: with a size-1 dim these strides pass as
    channels_last without being its dense strides (the layout oneDNN miscomputed)."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def _run_conv_case(case: dict, backend: str) -> None:
    import torch.nn.functional as F

    import fusedres

    dtype = case["dtype"]
    n, c, h, w, k = case["n"], case["c"], case["h"], case["w"], case["k"]
    x64 = torch.randn(n, c, h, w, dtype=torch.float64)
    w64 = torch.randn(k, c // case["groups"], case["r"], case["s"], dtype=torch.float64)
    w64 /= (w64[0].numel()) ** 0.5
    scale64 = torch.rand(k, dtype=torch.float64) + 0.5 if case["scale"] else None
    shift64 = torch.randn(k, dtype=torch.float64) if case["shift"] else None
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    p, q = F.conv2d(x64, w64, **conv).shape[2:]
    res64, res_stride = None, 1
    if case["residual"] == "full":
        res64 = torch.randn(n, k, p, q, dtype=torch.float64)
    elif case["residual"] == "option_a":
        res_stride = 2
        res64 = torch.randn(n, max(1, k // 2), 2 * p - 1, 2 * q - 1, dtype=torch.float64)

    def oracle_and_baseline(xx, ww, sc, sh, rr):
        y = F.conv2d(xx, ww, **conv)
        acc = torch.promote_types(y.dtype, torch.float32)
        y = y.to(acc)
        if sc is not None:
            y = y * sc.to(acc).view(1, -1, 1, 1)
        if sh is not None:
            y = y + sh.to(acc).view(1, -1, 1, 1)
        if rr is not None:
            term = rr[:, :, ::res_stride, ::res_stride].to(acc)
            y = y + F.pad(term, (0, 0, 0, 0, 0, k - term.shape[1]))
        return (torch.relu(y) if case["relu"] else y).to(xx.dtype)

    def leaves(dt):
        x = _layout(x64.to(dt), case["x_layout"])
        ww = w64.to(dt)
        ww = _odd_weight(ww) if case["w_layout"] == "odd" else _layout(ww, case["w_layout"])
        vec = torch.promote_types(dt, torch.float32)
        sc = None if scale64 is None else scale64.to(vec)
        sh = None if shift64 is None else shift64.to(vec)
        rr = None if res64 is None else res64.to(dt)
        ts = [x, ww, sc, sh, rr]
        if case["grad"]:
            ts = [None if t is None else t.detach().requires_grad_() for t in ts]
        return ts

    got_in = leaves(dtype)
    out = fusedres.conv_bn_act(*got_in, relu=case["relu"], backend=backend, residual_stride=res_stride, **conv)
    exp_in = leaves(torch.float64)
    expected = oracle_and_baseline(*exp_in)
    base_in = leaves(dtype) if dtype in (torch.float16, torch.bfloat16) else None
    baseline = oracle_and_baseline(*base_in) if base_in is not None else None
    assert out.is_contiguous(memory_format=torch.channels_last), "output not channels_last"
    _check("output", out, expected, dtype, baseline)
    if not case["grad"]:
        return
    g64 = torch.randn(out.shape, dtype=torch.float64)
    names = ["x", "weight", "scale", "shift", "residual"]
    idx = [i for i, t in enumerate(got_in) if t is not None]
    got = torch.autograd.grad(out, [got_in[i] for i in idx], g64.to(dtype))
    exp = torch.autograd.grad(expected, [exp_in[i] for i in idx], g64)
    base = torch.autograd.grad(baseline, [base_in[i] for i in idx], g64.to(dtype)) if baseline is not None else [None] * len(idx)
    for i, gg, ee, bb in zip(idx, got, exp, base):
        # ReLU masks flip with the rounding of the output: held to eager's error in the same dtype.
        _check(f"grad of {names[i]}", gg, ee, got_in[i].dtype, bb, compute=dtype)


def _block_case(draw, backend: str, train: bool):
    from hypothesis import strategies as st

    small = backend == "triton"
    kind = draw(st.sampled_from(["basic", "bottleneck"]))
    stride = draw(st.integers(1, 2))
    if kind == "basic":
        inplanes, planes, groups, width = draw(st.integers(1, 6)), draw(st.integers(1, 6)), 1, 64
    else:
        groups, width = draw(st.sampled_from([1, 2])), 64
        inplanes, planes = draw(st.integers(1, 12)), draw(st.integers(1, 4))
    projection = stride != 1 or inplanes != planes * (1 if kind == "basic" else 4) or draw(st.booleans())
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if not train else [torch.float32]
    if backend in ("triton", "reference"):
        dtypes.append(torch.float64)
    return dict(
        kind=kind, stride=stride, inplanes=inplanes, planes=planes, groups=groups, width=width,
        projection=projection,
        n=draw(st.integers(1, 2 if small else 3)),
        h=draw(st.integers(1, 5 if small else 9)), w=draw(st.integers(1, 5 if small else 9)),
        dtype=draw(st.sampled_from(dtypes)),
        x_layout=draw(st.sampled_from(["nchw", "channels_last", "strided"])),
        steps=draw(st.integers(1, 2)) if train else 1,
    )


def _make_block(case: dict):
    from torch import nn
    from torchvision.models import resnet

    from tests.conftest import randomize_batchnorm

    cls = resnet.BasicBlock if case["kind"] == "basic" else resnet.Bottleneck
    out = case["planes"] * cls.expansion
    downsample = None
    if case["projection"]:
        downsample = nn.Sequential(nn.Conv2d(case["inplanes"], out, 1, case["stride"], bias=False), nn.BatchNorm2d(out))
    extra = {} if case["kind"] == "basic" else dict(groups=case["groups"], base_width=case["width"])
    block = cls(case["inplanes"], case["planes"], case["stride"], downsample, **extra)
    randomize_batchnorm(block)
    return block


def _run_block_case(case: dict, backend: str, train: bool) -> None:
    import fusedres

    tv = _make_block(case)
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(case["n"] * 1000 + case["h"] * 10 + case["w"])
    xs = [torch.randn(case["n"], case["inplanes"], case["h"], case["w"], generator=gen, dtype=torch.float64)
          for _ in range(case["steps"])]

    def run(net, dt, convert):
        net = copy.deepcopy(net).to(dt)
        if convert:
            net = fusedres.convert(net, backend=backend)
        net.train(train)
        outs, grads = [], []
        for x in xs:
            inp = _layout(x.to(dt).clone(), case["x_layout"])  # a fresh leaf per run
            if train:
                inp.requires_grad_()
                try:
                    out = net(inp)
                except ValueError as e:  # one value per channel: eager raises, so must we
                    return ("raised", type(e).__name__, "Expected more than 1 value per channel" in str(e))
                g = torch.ones_like(out) * torch.linspace(-1, 1, out.numel(), dtype=dt).view(out.shape)
                out.backward(g)
                grads.append([inp.grad] + [p.grad for p in net.parameters()])
                for p in net.parameters():
                    p.grad = None
            else:
                with torch.no_grad():
                    out = net(inp)
            outs.append(out.detach())
        return outs, grads, [b for b in net.buffers() if b.is_floating_point()]

    got = run(tv, dtype, True)
    truth = run(tv, torch.float64, False)
    if got[0] == "raised" or truth[0] == "raised":
        assert got == truth, f"fused {got}, eager {truth}"
        return
    lowp = dtype in (torch.float16, torch.bfloat16)
    baseline = run(tv, dtype, False) if (lowp or train) else None
    factor = TRAIN_FACTOR if train else LOWP_FACTOR
    for step, (o, e) in enumerate(zip(got[0], truth[0])):
        _check(f"output (step {step})", o, e, dtype, None if baseline is None else baseline[0][step], factor)
    for step, (gs, es) in enumerate(zip(got[1], truth[1])):
        # The gradients of x and every parameter as one vector, normwise: with 2 values per
        # channel, dgamma = sum(g * xhat) cancels terms of size |g| down to 1e-3 of them, so its
        # own relative error measures that cancellation, not the kernels.
        flat = lambda ts: torch.cat([t.double().flatten() for t in ts])  # noqa: E731
        _check(f"gradients (step {step})", flat(gs).to(dtype), flat(es), dtype, flat(baseline[1][step]), factor,
               normwise=True)
    for i, (b, e) in enumerate(zip(got[2], truth[2])):
        _check(f"buffer {i}", b, e, b.dtype, None if baseline is None else baseline[2][i], factor)


def main(target: str, backend: str, examples: int) -> int:
    import warnings

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    warnings.simplefilter("ignore")  # fallback warnings (float64 on native) are expected here

    if target == "conv_bn_act":
        strategy = st.composite(lambda draw: _conv_case(draw, backend))()
        run = lambda case: _run_conv_case(case, backend)  # noqa: E731
    else:
        train = target == "block_train"
        strategy = st.composite(lambda draw: _block_case(draw, backend, train))()
        run = lambda case: _run_block_case(case, backend, train)  # noqa: E731

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(case):
        print("case", case, flush=True)  # the last line before a crash names the case
        torch.manual_seed(0)
        run(case)

    fuzz()
    print(f"fuzz {target} {backend}: {examples} examples passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
