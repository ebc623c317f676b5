"""Train-mode ops (conv_bn_stats, bn_finalize, bn_add_act, bn_backward_*) against the reference."""

from __future__ import annotations

import pytest
import torch

from fusedres.ops import _ref
from fusedres.ops._dispatch import op_for
from tests.conftest import DTYPES, assert_matches_reference, device_params, fused_backends

CL = torch.channels_last
BACKENDS = [pytest.param(b, id=b) for b in fused_backends("cpu")]

# (N, C, H, W, K, R, S, stride, padding, dilation, groups)
CONV_CASES = {
    "1x1": (2, 8, 7, 7, 16, 1, 1, 1, 0, 1, 1),
    "3x3_stride2_odd": (2, 5, 13, 13, 7, 3, 3, 2, 1, 1, 1),
    "3x3_groups4": (2, 16, 7, 7, 8, 3, 3, 1, 1, 1, 4),
    "7x7_stem_batch1": (1, 3, 13, 13, 8, 7, 7, 2, 3, 1, 1),
}


def _as_double(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _conv_inputs(case, dtype, device, prologue):
    n, c, h, w, k, r, s, stride, padding, dilation, groups = case
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=CL)
    weight = (torch.randn(k, c // groups, r, s, device=device) / (c // groups * r * s) ** 0.5).to(dtype)
    acc = torch.promote_types(dtype, torch.float32)
    scale_in = (torch.rand(c, device=device) + 0.5).to(acc) if prologue else None
    shift_in = torch.randn(c, device=device).to(acc) if prologue else None
    conv = ((stride, stride), (padding, padding), (dilation, dilation), groups)
    return (x, weight, scale_in, shift_in, *conv)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu_prologue", "raw_input"])
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_stats(backend, case, prologue, dtype, device, poison_outputs):
    args = _conv_inputs(CONV_CASES[case], dtype, device, prologue)
    y, mean, m2 = op_for("conv_bn_stats", backend)(*args)
    exact = _ref.conv_bn_stats(*_as_double(*args[:4]), *args[4:])
    base = _ref.conv_bn_stats(*args)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert mean.dtype == torch.float32 and m2.dtype == torch.float32
    assert_matches_reference(y, exact[0], dtype, base[0], what="y")
    # Statistics are judged against those of the y the kernel stored, which is what BN normalises.
    y64 = y.double()
    mean_of_y = y64.mean(dim=(0, 2, 3))
    m2_of_y = (y64 - mean_of_y.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    assert_matches_reference(mean, mean_of_y, torch.float32, what="mean")
    assert_matches_reference(m2, m2_of_y, torch.float32, what="m2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_stats_welford_accuracy_when_mean_dwarfs_std(backend):
    """|mean| = 1e3 * std: E[y^2] - E[y]^2 would lose every digit in fp32; Welford/Chan does not."""
    x = (1.0 + 1e-3 * torch.randn(4, 8, 16, 16)).contiguous(memory_format=CL)
    weight = torch.full((4, 8, 1, 1), 1.0 / 8)
    y, mean, m2 = op_for("conv_bn_stats", backend)(x, weight, None, None, (1, 1), (0, 0), (1, 1), 1)
    y64 = y.double()
    mean_ref = y64.mean(dim=(0, 2, 3))
    m2_ref = (y64 - mean_ref.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    assert (mean_ref.abs() / (m2_ref / y[:, 0].numel()).sqrt()).min() > 500
    assert ((m2.double() - m2_ref).abs() / m2_ref).max() < 1e-3


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False], ids=["running_stats", "no_running_stats"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_finalize(backend, track, affine, device, poison_outputs):
    k, count, momentum, eps = 7, 50, 0.1, 1e-5
    mean = torch.randn(k, device=device)
    m2 = torch.rand(k, device=device) * count
    weight = torch.rand(k, device=device) + 0.5 if affine else None
    bias = torch.randn(k, device=device) if affine else None
    running = [torch.randn(k, device=device), torch.rand(k, device=device) + 0.5] if track else [None, None]
    expected_running = [None if t is None else t.clone() for t in running]
    got = op_for("bn_finalize", backend)(mean, m2, count, weight, bias, *running, momentum, eps)
    exp = _ref.bn_finalize(mean, m2, count, weight, bias, *expected_running, momentum, eps)
    for name, g, e in zip(("scale", "shift", "invstd"), got, exp):
        assert_matches_reference(g, e.double(), torch.float32, what=name)
    for g, e in zip(running, expected_running):
        if g is not None:
            assert_matches_reference(g, e.double(), torch.float32, what="running statistics")


SHORTCUTS = ["identity", "projection", "option_a", "none"]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_add_act(backend, shortcut, relu, dtype, device, poison_outputs):
    n, k, p, q = 2, 12, 7, 9
    y = torch.randn(n, k, p, q, device=device).to(dtype).contiguous(memory_format=CL)
    scale, shift = torch.rand(k, device=device) + 0.5, torch.randn(k, device=device)
    sc = sc_scale = sc_shift = None
    stride = 1
    if shortcut in ("identity", "projection"):
        sc = torch.randn(n, k, p, q, device=device).to(dtype).contiguous(memory_format=CL)
    if shortcut == "projection":
        sc_scale, sc_shift = torch.rand(k, device=device) + 0.5, torch.randn(k, device=device)
    if shortcut == "option_a":  # half the channels, twice the resolution (13 -> 7, 17 -> 9)
        sc, stride = torch.randn(n, k // 2, 2 * p - 1, 2 * q - 1, device=device).to(dtype).contiguous(memory_format=CL), 2
    args = (y, scale, shift, sc, sc_scale, sc_shift, stride, relu)
    out = op_for("bn_add_act", backend)(*args)
    exact = _ref.bn_add_act(*_as_double(y, scale, shift, sc, sc_scale, sc_shift), stride, relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert_matches_reference(out, exact, dtype, _ref.bn_add_act(*args))


MASKS = ["saved_output", "recomputed_prologue", "no_relu"]


def _bn_backward_inputs(mask, dtype, device, affine=True):
    shape = (2, 6, 5, 7)
    k = shape[1]
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=CL)
    y = (torch.randn(shape, device=device) * 2 + 1).to(dtype).contiguous(memory_format=CL)
    y64 = y.double()
    mean = y64.mean(dim=(0, 2, 3)).float()
    invstd = y64.var(dim=(0, 2, 3), unbiased=False).add(1e-5).rsqrt().float()
    act_out = act_scale = act_shift = None
    if mask == "saved_output":
        act_out = torch.relu(torch.randn(shape, device=device)).to(dtype).contiguous(memory_format=CL)
    if mask == "recomputed_prologue":
        act_scale, act_shift = torch.rand(k, device=device) + 0.5, torch.randn(k, device=device)
    weight = torch.rand(k, device=device) + 0.5 if affine else None
    return grad, y, mean, invstd, weight, act_out, act_scale, act_shift


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_backward_reduce_and_elemt(backend, mask, dtype, device, poison_outputs):
    grad, y, mean, invstd, weight, act_out, act_scale, act_shift = _bn_backward_inputs(mask, dtype, device)
    masks = (act_out, act_scale, act_shift)
    sums = op_for("bn_backward_reduce", backend)(grad, y, mean, invstd, *masks)
    exact_sums = _ref.bn_backward_reduce(*_as_double(grad, y, mean, invstd, *masks))
    base_sums = _ref.bn_backward_reduce(grad, y, mean, invstd, *masks)
    for name, g, e, b in zip(("sum_g", "sum_g_xhat"), sums, exact_sums, base_sums):
        assert g.dtype == torch.float32
        assert_matches_reference(g, e, dtype, b, what=name)
    count = y.numel() // y.shape[1]
    sums32 = [s.float() for s in exact_sums]  # the same sums for all three, so dy alone is judged
    dy = op_for("bn_backward_elemt", backend)(grad, y, mean, invstd, weight, *sums32, count, *masks)
    exact_dy = _ref.bn_backward_elemt(*_as_double(grad, y, mean, invstd, weight, *sums32), count, *_as_double(*masks))
    base_dy = _ref.bn_backward_elemt(grad, y, mean, invstd, weight, *sums32, count, *masks)
    assert dy.dtype == dtype and dy.is_contiguous(memory_format=CL)
    assert_matches_reference(dy, exact_dy, dtype, base_dy, what="dy")


# (N, C, H, W, K, R, S, stride, padding, dilation, groups): what each backward GEMM must handle
BACKWARD_CASES = {
    "1x1": (2, 8, 7, 7, 16, 1, 1, 1, 0, 1, 1),
    "1x1_stride2_odd": (1, 8, 7, 9, 12, 1, 1, 2, 0, 1, 1),
    "3x3_stride2_odd": (2, 5, 13, 13, 7, 3, 3, 2, 1, 1, 1),
    "3x3_groups4": (2, 16, 7, 7, 8, 3, 3, 1, 1, 1, 4),
    "3x3_dilation2": (2, 6, 9, 9, 8, 3, 3, 1, 2, 2, 1),
}
# (BN-backward prologue on the gradient, BN+ReLU prologue on the input / mask + sums in dgrad)
FUSIONS = {"both": (True, True), "grad_prologue": (True, False), "input_prologue": (False, True)}


def _conv_bn_backward_inputs(case, dtype, device, bn_grad, prologue):
    x, weight, scale_in, shift_in, *conv = _conv_inputs(case, dtype, device, prologue)
    n, c, h, w, k, r, s, stride, padding, dilation, groups = case
    p, q = ((size + 2 * padding - dilation * (kern - 1) - 1) // stride + 1 for size, kern in ((h, r), (w, s)))
    grad = torch.randn(n, k, p, q, device=device).to(dtype).contiguous(memory_format=CL)
    grad_y = coef = mean_in = invstd_in = None
    if bn_grad:
        grad_y = (torch.randn(n, k, p, q, device=device) * 2 + 1).to(dtype).contiguous(memory_format=CL)
        count = n * p * q
        mean, invstd = torch.randn(k, device=device) + 1, torch.rand(k, device=device) + 0.5
        sums = torch.randn(k, device=device) * count ** 0.5, torch.randn(k, device=device) * count ** 0.5
        coef = _ref.bn_backward_coef(mean, invstd, torch.rand(k, device=device) + 0.5, *sums, count)
    if prologue:
        mean_in, invstd_in = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    return (grad, grad_y, coef, x, weight, scale_in, shift_in, mean_in, invstd_in, *conv)


def _check_conv_bn_backward(outputs, args, output_mask, dtype):
    exact = _ref.conv_bn_backward(*_as_double(*args[:9]), *args[9:], output_mask)
    base = _ref.conv_bn_backward(*args, output_mask)
    grad_input, grad_weight, sum_g, sum_g_xhat = outputs
    x, weight, scale_in = args[3], args[4], args[5]
    if output_mask[0]:
        assert grad_input.dtype == dtype and grad_input.is_contiguous(memory_format=CL)
        assert_matches_reference(grad_input, exact[0], dtype, base[0], what="grad_input")
    else:
        assert grad_input.numel() == 0
    if output_mask[1]:
        assert grad_weight.dtype == weight.dtype and grad_weight.is_contiguous()
        assert_matches_reference(grad_weight, exact[1], dtype, base[1], what="grad_weight")
    else:
        assert grad_weight.numel() == 0
    if output_mask[0] and scale_in is not None:
        # Sums of g as the kernel stored it (the reference's are of its own rounding of g).
        g = grad_input.double()
        xhat = (x.double() - args[7].double().view(1, -1, 1, 1)) * args[8].double().view(1, -1, 1, 1)
        for name, got, want in (("sum_g", sum_g, g.sum(dim=(0, 2, 3))),
                                ("sum_g_xhat", sum_g_xhat, (g * xhat).sum(dim=(0, 2, 3)))):
            assert got.dtype == torch.float32 and got.shape == (x.shape[1],)
            assert_matches_reference(got, want, torch.float32, what=name)
    else:
        assert sum_g.numel() == 0 and sum_g_xhat.numel() == 0


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("case", list(BACKWARD_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_backward(backend, case, fusion, dtype, device, poison_outputs):
    args = _conv_bn_backward_inputs(BACKWARD_CASES[case], dtype, device, *FUSIONS[fusion])
    output_mask = [True, True]
    outputs = op_for("conv_bn_backward", backend)(*args, output_mask)
    _check_conv_bn_backward(outputs, args, output_mask, dtype)


@pytest.mark.parametrize("output_mask", [(True, False), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_backward_output_mask(backend, output_mask, poison_outputs):
    """Only the asked-for outputs are computed; the others are empty tensors."""
    args = _conv_bn_backward_inputs(BACKWARD_CASES["3x3_stride2_odd"], torch.float32, "cpu", True, True)
    outputs = op_for("conv_bn_backward", backend)(*args, list(output_mask))
    _check_conv_bn_backward(outputs, args, list(output_mask), torch.float32)


def test_bn_backward_coef_is_bn_backward_elemt():
    """The prologue's four coefficients give bn_backward_elemt's input gradient."""
    grad, y, mean, invstd, weight, *_ = _bn_backward_inputs("no_relu", torch.float64, "cpu")
    count = y.numel() // y.shape[1]
    sum_g, sum_g_xhat = _ref.bn_backward_reduce(grad, y, mean.double(), invstd.double(), None, None, None)
    coef = _ref.bn_backward_coef(mean.double(), invstd.double(), weight.double(), sum_g, sum_g_xhat, count)
    want = _ref.bn_backward_elemt(grad, y, mean, invstd, weight, sum_g, sum_g_xhat, count, None, None, None)
    torch.testing.assert_close(_ref.bn_grad_prologue(grad, y, coef), want, rtol=1e-12, atol=1e-12)
