"""Issue 15: nothing silently wrong, nothing crashes. Each case the differential fuzz found, kept:
stale eval output after training, zero channels, double backward, train edge cases against
eager, unclear argument errors, float64 backward, torch CPU bugs routed around, weight layouts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fusedres
from fusedres import backends
from tests.conftest import (
    TOLERANCE,
    assert_fused_ran,
    assert_matches_reference,
    fused_backends,
    fused_ops,
    randomize_batchnorm,
    run_isolated,
)

FUSED = fused_backends("cpu")
ALL = FUSED + ["reference"]
NATIVE = "native" in FUSED


# --- 1. every in-place update the library makes bumps the version: eval after train is fresh ---


@pytest.mark.parametrize("backend", ALL + ["auto"])
def test_eval_after_train_uses_the_new_running_statistics(backend, monkeypatch):
    if backend == "auto":
        # auto's train plan may be the eager block (decided by timing): pinned to it here, since
        # eager BatchNorm updates the running statistics without bumping their versions.
        monkeypatch.setattr(backends, "resolve_train", lambda *args, **kwargs: backends.EAGER)
    block = fusedres.BasicBlock(8, 8, backend=backend)
    randomize_batchnorm(block)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        block.eval()
        block(x)  # caches the BN fold
        block.train()
        with fused_ops() as log:
            block(3 * x + 1)  # moves the running statistics
        if backend in FUSED:
            assert_fused_ran(log, backend)
        block.eval()
        got, expected = block(x), block.forward_unfused(x)
    assert_matches_reference(got, expected.double(), torch.float32)


@pytest.mark.parametrize("backend", [b for b in ("native",) if NATIVE] + ["auto"])
def test_resnet18_eval_train_eval_matches_torchvision(backend, monkeypatch):
    if backend == "auto":  # as above: the eager train plan, not a timing-dependent choice
        monkeypatch.setattr(backends, "resolve_train", lambda *args, **kwargs: backends.EAGER)
    model = torchvision.models.resnet18()
    randomize_batchnorm(model)
    fused = fusedres.convert(copy.deepcopy(model), backend=backend)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused.eval()(x)
        fused.train()(3 * x + 1)
        got = fused.eval()(x)
    model.load_state_dict(fused.state_dict())
    with torch.no_grad():
        expected = model.double().eval()(x.double())
    assert_matches_reference(got, expected, torch.float32, what="logits after eval -> train -> eval")


@pytest.mark.parametrize("backend", ALL)
def test_bn_finalize_bumps_the_running_statistics_versions(backend):
    from fusedres.ops._dispatch import op_for

    mean, m2 = torch.randn(4), torch.rand(4) * 8
    running_mean, running_var = torch.randn(4), torch.rand(4) + 0.5
    versions = running_mean._version, running_var._version
    op_for("bn_finalize", backend)(mean, m2, 9, None, None, running_mean, running_var, 0.1, 1e-5)
    assert running_mean._version > versions[0] and running_var._version > versions[1]
    with torch.inference_mode():  # inference tensors have no version counter: still no error
        rm, rv = torch.zeros(4), torch.ones(4)
        op_for("bn_finalize", backend)(mean, m2, 9, None, None, rm, rv, 0.1, 1e-5)
    assert torch.allclose(rm, 0.1 * mean)


# --- 3. zero input channels: one clear error everywhere, no crash ---


@pytest.mark.parametrize("backend", ALL + ["auto"])
def test_zero_input_channels_raise_a_clear_error(backend):
    with pytest.raises(ValueError, match="x has no input channels"):
        fusedres.conv_bn_act(torch.randn(2, 0, 5, 5), torch.randn(4, 0, 3, 3), padding=1, backend=backend)
    with pytest.raises(ValueError, match="weight has no filters"):
        fusedres.conv_bn_act(torch.randn(2, 3, 5, 5), torch.randn(0, 3, 3, 3), padding=1, backend=backend)


@pytest.mark.skipif(not NATIVE, reason="needs the compiled extension")
def test_zero_input_channels_in_the_cpp_ops_do_not_crash():
    out = run_isolated(
        "import torch, fusedres\n"
        "x, w = torch.randn(2, 0, 5, 5), torch.randn(4, 0, 3, 3)\n"
        "for call in (lambda: torch.ops.fusedres.conv_bn_act(x, w, None, None, None, [1, 1], [1, 1], [1, 1], 1, True),\n"
        "             lambda: torch.ops.fusedres.conv_bn_stats(x, w, None, None, [1, 1], [1, 1], [1, 1], 1)):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        print('raised', 'no input channels' in str(e))\n"
    )
    assert out.split() == ["raised", "True"] * 2, out


# --- 5. double backward: a clear error, never a silently wrong second derivative ---


@pytest.mark.parametrize("backend", FUSED)
def test_conv_bn_act_double_backward_raises(backend):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    out = fusedres.conv_bn_act(x, w, scale, shift, padding=1, backend=backend)
    (gw,) = torch.autograd.grad(out.square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gw.square().sum().backward()


def test_reference_double_backward_matches_eager():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    scale, shift = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)

    def second(fn):
        (gw,) = torch.autograd.grad(fn().square().sum(), w, create_graph=True)
        return torch.autograd.grad(gw.square().sum(), w)[0]

    got = second(lambda: fusedres.conv_bn_act(x, w, scale, shift, padding=1, backend="reference"))
    expected = second(lambda: torch.relu(F.conv2d(x, w, padding=1) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)))
    assert_matches_reference(got, expected, torch.float64)


@pytest.mark.parametrize("backend", FUSED)
def test_train_block_gradient_penalty_raises(backend):
    block = fusedres.BasicBlock(4, 4, backend=backend).train()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.square().sum().backward()


# --- 6. train-mode edge cases behave as eager ---


@pytest.mark.parametrize("backend", ALL)
def test_batch1_with_1x1_spatial_raises_like_batchnorm(backend):
    tv = torchvision.models.resnet.BasicBlock(4, 4).train()
    block = fusedres.convert(copy.deepcopy(tv), backend=backend)
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tv(x)
    before = copy.deepcopy(block.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        block(x)
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k), "statistics moved"


@pytest.mark.parametrize("backend", ALL)
def test_empty_batch_in_train_mode_is_eager(backend):
    tv = torchvision.models.resnet.BasicBlock(4, 4).train()
    randomize_batchnorm(tv)
    block = fusedres.convert(copy.deepcopy(tv), backend=backend)
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    out, expected = block(x), tv(x)
    assert out.shape == expected.shape == (0, 4, 6, 6)
    out.sum().backward()
    for (name, a), b in zip(tv.named_buffers(), block.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ALL)
def test_running_statistics_that_require_grad(backend):
    tv = torchvision.models.resnet.BasicBlock(4, 4).train()
    block = fusedres.convert(copy.deepcopy(tv), backend=backend)
    for module in (tv, block):
        module.bn1.running_mean.requires_grad_(True)
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(RuntimeError, match="running_mean"):
        tv(x)
    with pytest.raises(RuntimeError, match="running_mean"):
        block(x)
    with torch.no_grad():  # eager updates them under no_grad: so do we
        expected, got = tv(x), block(x)
    assert_matches_reference(got, expected.double(), torch.float32)
    assert torch.allclose(block.bn1.running_mean, tv.bn1.running_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ALL)
def test_fp16_input_with_fp32_weights_raises_in_both_modes(backend, mode):
    block = fusedres.BasicBlock(4, 4, backend=backend)
    getattr(block, mode)()
    with pytest.raises(TypeError, match="dtype"):
        block(torch.randn(2, 4, 6, 6, dtype=torch.float16))


# --- 7. unclear errors: the argument is named ---


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(stride=1.5), TypeError, "stride must be an int or a pair of ints"),
        (dict(stride=(1, 1.5)), TypeError, "stride must be an int or a pair of ints"),
        (dict(padding="same"), ValueError, "padding='same' is not supported"),
        (dict(stride=torch.tensor(2)), TypeError, "stride must be an int or a pair of ints"),
        (dict(groups=2.0), TypeError, "groups must be an int"),
        (dict(dilation=True), TypeError, "dilation must be an int"),
        (dict(residual=torch.randn(1, 6, 5, 5), residual_stride=1.0), TypeError, "residual_stride must be an int"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("backend", ALL)
def test_bad_conv_arguments_are_named(backend, kwargs, error, match):
    args = dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(6, 4, 3, 3), padding=1, backend=backend)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fusedres.conv_bn_act(**args)


# --- 8. float64 is float64-accurate in conv_bn_act's backward ---


@pytest.mark.parametrize("backend", [b for b in FUSED if backends.unusable_reason(b, torch.device("cpu"), torch.float64) is None])
def test_conv_bn_act_backward_float64(backend):
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    shift = torch.randn(6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    leaves = (x, w, scale, shift)
    with fused_ops() as log:
        out = fusedres.conv_bn_act(*leaves, padding=1, backend=backend)
        got = torch.autograd.grad(out, leaves, grad)
    assert_fused_ran(log, backend)
    expected = torch.autograd.grad(
        torch.relu(F.conv2d(x, w, padding=1) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)), leaves, grad)
    for name, g, e in zip(("x", "weight", "scale", "shift"), got, expected):
        assert g.dtype == torch.float64, name
        assert_matches_reference(g, e, torch.float64, what=f"grad of {name}")


# --- 9. torch 2.14's heap corruption in the CPU weight gradient of strided 1x1 convs ---


@pytest.mark.parametrize("backend", [b for b in ("native",) if NATIVE] + ["reference"])
def test_strided_projection_bottleneck_trains_without_heap_corruption(backend):
    """The fuzz's case: 200 train steps of Bottleneck(14, 3, stride=2) with a 1x1 projection on
    NCHW input; with channels_last operands ATen corrupts the heap within a few steps."""
    out = run_isolated(
        "import torch, fusedres\n"
        "from torch import nn\n"
        "torch.manual_seed(0)\n"
        "ds = nn.Sequential(nn.Conv2d(14, 12, 1, 2, bias=False), nn.BatchNorm2d(12))\n"
        f"block = fusedres.Bottleneck(14, 3, stride=2, downsample=ds, backend={backend!r}).train()\n"
        "opt = torch.optim.SGD(block.parameters(), lr=0.01)\n"
        "for _ in range(200):\n"
        "    opt.zero_grad()\n"
        "    block(torch.randn(3, 14, 10, 8, requires_grad=True)).square().mean().backward()\n"
        "    opt.step()\n"
        "print('ok', all(torch.isfinite(p).all().item() for p in block.parameters()))\n"
    )
    assert out.split() == ["ok", "True"], out


def test_convolution_backward_routes_strided_1x1_through_nchw():
    """The helper every backward uses: the routed case (channels_last input, channels_last-strided
    1x1 weight, stride 2) gives the NCHW gradients, in a subprocess (unrouted, it aborts there)."""
    out = run_isolated(
        "import torch\n"
        "from fusedres.ops._aten import convolution_backward\n"
        "torch.manual_seed(0)\n"
        "cl = torch.channels_last\n"
        "worst = 0.0\n"
        "for _ in range(300):\n"
        "    x = torch.randn(3, 7, 10, 8).contiguous(memory_format=cl)\n"
        "    w = torch.empty(12, 7, 1, 1, memory_format=cl).normal_()  # strides (7, 1, 7, 7)\n"
        "    g = torch.randn(3, 12, 5, 4).contiguous(memory_format=cl)\n"
        "    dx, dw = convolution_backward(g, x, w, (2, 2), (0, 0), (1, 1), 1, (True, True))\n"
        "    ex, ew, _ = torch.ops.aten.convolution_backward(g, *(t.clone(memory_format=torch.contiguous_format) for t in (x, w)), None,\n"
        "        [2, 2], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])\n"
        "    worst = max(worst, (dx - ex).abs().max().item(), (dw - ew).abs().max().item())\n"
        "print('ok', worst < 1e-4)\n"
    )
    assert out.split() == ["ok", "True"], out


# --- 10. auto's timing never calls eager's reduced-precision CPU conv ---


def test_auto_does_not_time_eager_low_precision_cpu_convs():
    cpu = torch.device("cpu")
    for dtype in (torch.float16, torch.bfloat16):
        candidates = backends.auto_candidates(cpu, dtype)
        if NATIVE:
            assert "reference" not in candidates, candidates
        else:
            assert candidates == ["reference"]
    assert backends.auto_candidates(cpu, torch.float32)[-1] == "reference"


def test_auto_fp16_case_of_the_fuzz_runs():
    out = run_isolated(
        "import torch, fusedres\n"
        "torch.manual_seed(0)\n"
        "x, w = torch.randn(1, 1, 4, 1).half(), torch.randn(1, 1, 1, 1).half()\n"
        "for _ in range(20):\n"
        "    y = fusedres.conv_bn_act(x, w, stride=2, padding=(0, 1), dilation=2, backend='auto')\n"
        "e = torch.relu(torch.nn.functional.conv2d(x.float(), w.float(), None, 2, (0, 1), 2))\n"
        "print('ok', y.shape == e.shape and torch.equal(y.float(), e))\n"
    )
    assert out.split() == ["ok", "True"], out


# --- 11. weight layouts oneDNN miscomputes are normalised ---


def _odd_grouped_weight():
    """Strides (6, 1, 2, 1) for shape (6, 2, 3, 1): 'contiguous' in channels_last, yet not dense."""
    return torch.randn(6, 2, 3, 1).transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", ALL + ["auto"])
def test_grouped_conv_with_an_odd_weight_layout(backend, memory_format):
    w = _odd_grouped_weight().requires_grad_()
    assert w.stride() == (6, 1, 2, 1)
    x = torch.randn(2, 6, 7, 5).contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    out = fusedres.conv_bn_act(x, w, padding=(1, 0), groups=3, relu=False, backend=backend)
    dx, dw = torch.autograd.grad(out, (x, w), grad.float())
    x64, w64 = x.detach().double().contiguous().requires_grad_(), w.detach().double().contiguous().requires_grad_()
    expected = F.conv2d(x64, w64, padding=(1, 0), groups=3)
    ex, ew = torch.autograd.grad(expected, (x64, w64), grad)
    assert_matches_reference(out, expected, torch.float32)
    assert_matches_reference(dx, ex, torch.float32, what="grad of x")
    assert_matches_reference(dw, ew, torch.float32, what="grad of weight")
