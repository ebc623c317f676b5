"""conv_bn_act and its backward: every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres import _extension
from fusedres.ops import _ref
from fusedres.ops.bn_act_backward import bn_act_backward
from tests.conftest import DTYPES, assert_matches_reference, device_params, fused_backends

CL = torch.channels_last

# (N, C, H, W, K, R, S, stride, padding, dilation, groups): the awkward cases of DESIGN.md §3.
CASES = {
    "1x1": (2, 8, 7, 7, 16, 1, 1, 1, 0, 1, 1),
    "1x1_stride2_projection": (2, 8, 7, 7, 16, 1, 1, 2, 0, 1, 1),
    "3x3": (2, 8, 13, 13, 12, 3, 3, 1, 1, 1, 1),
    "3x3_stride2_odd_channels": (2, 5, 13, 13, 7, 3, 3, 2, 1, 1, 1),
    "7x7_stride2_stem": (1, 3, 13, 13, 8, 7, 7, 2, 3, 1, 1),
    "3x3_groups4": (2, 16, 7, 7, 8, 3, 3, 1, 1, 1, 4),
    "3x3_dilation2": (1, 4, 13, 13, 6, 3, 3, 1, 2, 2, 1),
    "3x3_batch1_97x131": (1, 4, 97, 131, 4, 3, 3, 1, 1, 1, 1),
}

# A block's option-A shortcut read by a stride-2 conv's epilogue: the residual is 13x13 like the
# conv's input, with half the 12 output channels, and is read every other pixel (-> 7x7).
OPTION_A_CASE = (2, 6, 13, 13, 12, 3, 3, 2, 1, 1, 1)

# Which optional operands the epilogue gets: (scale, shift, residual, relu).
EPILOGUES = {
    "scale_shift_residual_relu": (True, True, True, True),
    "shift_relu": (False, True, False, True),
    "scale_identity": (True, False, False, False),
    "bare_conv": (False, False, False, False),
}


def make_inputs(case, dtype, device, epilogue=EPILOGUES["scale_shift_residual_relu"], layout=CL):
    n, c, h, w, k, r, s, stride, padding, dilation, groups = case
    has_scale, has_shift, has_residual, relu = epilogue
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (s - 1) - 1) // stride + 1
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=layout)
    weight = (torch.randn(k, c // groups, r, s, device=device) / (c // groups * r * s) ** 0.5).to(dtype)
    affine_dtype = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for gradcheck
    scale = (torch.rand(k, device=device) + 0.5).to(affine_dtype) if has_scale else None
    shift = torch.randn(k, device=device).to(affine_dtype) if has_shift else None
    residual = torch.randn(n, k, p, q, device=device).to(dtype).contiguous(memory_format=layout) if has_residual else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu)
    return (x, weight, scale, shift, residual), kwargs


def make_option_a_inputs(dtype, device):
    tensors, kwargs = make_inputs(OPTION_A_CASE, dtype, device)
    n, _, h, w, k = OPTION_A_CASE[:5]
    residual = torch.randn(n, k // 2, h, w, device=device).to(dtype).contiguous(memory_format=CL)
    return (*tensors[:4], residual), dict(kwargs, residual_stride=2)


def reference(tensors, kwargs, dtype):
    """float64 truth and plain PyTorch in ``dtype`` (the low-precision baseline)."""
    x, weight, scale, shift, residual = tensors
    conv = dict(kwargs)
    relu = conv.pop("relu")
    residual_stride = conv.pop("residual_stride", 1)
    args = [conv["stride"], conv["padding"], conv["dilation"]]
    as_pairs = [(a, a) for a in args]
    exact = _ref.conv_bn_act(
        x.double(), weight.double(), None if scale is None else scale.double(),
        None if shift is None else shift.double(), None if residual is None else residual.double(),
        *as_pairs, conv["groups"], relu, residual_stride,
    )
    baseline = _ref.conv_bn_act(x, weight, scale, shift, residual, *as_pairs, conv["groups"], relu, residual_stride)
    return exact, baseline


def backend_params(device="cpu"):
    return [pytest.param(b, id=b) for b in fused_backends(device)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_forward_matches_reference(backend, case, dtype, device, poison_outputs):
    tensors, kwargs = make_inputs(CASES[case], dtype, device)
    out = fusedres.conv_bn_act(*tensors, **kwargs, backend=backend)
    exact, baseline = reference(tensors, kwargs, dtype)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert_matches_reference(out, exact, dtype, baseline)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", list(EPILOGUES), ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_epilogue_variants(backend, epilogue, dtype, device, poison_outputs):
    tensors, kwargs = make_inputs(CASES["3x3_stride2_odd_channels"], dtype, device, EPILOGUES[epilogue])
    out = fusedres.conv_bn_act(*tensors, **kwargs, backend=backend)
    exact, baseline = reference(tensors, kwargs, dtype)
    assert_matches_reference(out, exact, dtype, baseline)


def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=CL)
    if layout == "contiguous":
        return t.contiguous()
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]  # arbitrary strides: every other column of a wider tensor


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
@pytest.mark.parametrize("backend", backend_params())
def test_memory_formats(backend, layout, device, poison_outputs):
    """Any input layout is accepted; the output is always channels_last."""
    tensors, kwargs = make_inputs(CASES["3x3"], torch.float32, device)
    x, weight, scale, shift, residual = tensors
    args = (_relayout(x, layout), _relayout(weight, layout), scale, shift, _relayout(residual, layout))
    out = fusedres.conv_bn_act(*args, **kwargs, backend=backend)
    exact, _ = reference(tensors, kwargs, torch.float32)
    assert out.is_contiguous(memory_format=CL)
    assert_matches_reference(out, exact, torch.float32)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["3x3_stride2_odd_channels", "3x3_groups4", "1x1_stride2_projection"])
@pytest.mark.parametrize("backend", backend_params())
def test_backward_matches_reference(backend, case, dtype, device, poison_outputs):
    check_backward(backend, *make_inputs(CASES[case], dtype, device), dtype)


def check_backward(backend, tensors, kwargs, dtype):
    """Every gradient of the fused op against the reference backend's autograd (float64 truth,
    and the same dtype as the low-precision baseline)."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fusedres.conv_bn_act(*leaves, **kwargs, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)

    exact_leaves = [t.detach().double().requires_grad_() for t in tensors]
    exact_out = fusedres.conv_bn_act(*exact_leaves, **kwargs, backend="reference")
    exact_grads = torch.autograd.grad(exact_out, exact_leaves, grad_out.double())
    base_leaves = [t.detach().requires_grad_() for t in tensors]
    base_out = fusedres.conv_bn_act(*base_leaves, **kwargs, backend="reference")
    base_grads = torch.autograd.grad(base_out, base_leaves, grad_out)
    for name, g, e, b in zip(("x", "weight", "scale", "shift", "residual"), grads, exact_grads, base_grads):
        assert g is not None and g.dtype == b.dtype, f"grad of {name}"
        # Per-channel sums over many elements: judge the reduced-precision grads like the outputs.
        assert_matches_reference(g, e, dtype, b, what=f"grad of {name}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_option_a_residual(backend, dtype, device, poison_outputs):
    """The residual read in place as option A: forward, and the residual's gradient scattered back
    to the pixels and channels the epilogue read (zero elsewhere)."""
    tensors, kwargs = make_option_a_inputs(dtype, device)
    out = fusedres.conv_bn_act(*tensors, **kwargs, backend=backend)
    exact, baseline = reference(tensors, kwargs, dtype)
    assert out.shape == (2, 12, 7, 7)
    assert_matches_reference(out, exact, dtype, baseline)
    check_backward(backend, tensors, kwargs, dtype)


@pytest.mark.parametrize("residual_shape", [(2, 6, 11, 11), (2, 13, 13, 13), (1, 6, 13, 13), (2, 6, 13)],
                         ids=["spatial", "too_many_channels", "batch", "3d"])
def test_option_a_residual_shape_mismatch_is_rejected(residual_shape):
    tensors, kwargs = make_option_a_inputs(torch.float32, "cpu")
    residual = torch.randn(residual_shape)
    match = r"residual must have the output's shape \(2, 12, 7, 7\) once subsampled by residual_stride=2"
    with pytest.raises(ValueError, match=match):
        fusedres.conv_bn_act(*tensors[:4], residual, **kwargs)
    if _extension.loaded():  # the C++ op checks on its own, with the same message
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fusedres.conv_bn_act(*tensors[:4], residual, (2, 2), (1, 1), (1, 1), 1, True, 2)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("backend", backend_params())
def test_bn_act_backward_op(backend, relu, dtype, device, poison_outputs):
    shape = (2, 7, 5, 9)
    grad_out = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=CL)
    out = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=CL)
    scale = torch.rand(shape[1], device=device) + 0.5
    got = bn_act_backward(grad_out, out, scale, relu, backend)
    exact = _ref.bn_act_backward(grad_out.double(), out.double(), scale.double(), relu)
    base = _ref.bn_act_backward(grad_out, out, scale, relu)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=CL)
    assert got[1].dtype == torch.float32 and got[1].shape == (shape[1],)
    for name, g, e, b in zip(("grad_conv", "grad_shift"), got, exact, base, strict=True):
        assert_matches_reference(g, e, dtype, b, what=name)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in fused_backends("cpu") if b == "triton"])
def test_gradcheck_float64(backend):
    tensors, kwargs = make_inputs((1, 4, 5, 5, 3, 3, 3, 2, 1, 1, 1), torch.float64, "cpu")
    leaves = tuple(t.detach().requires_grad_() for t in tensors)
    fn = lambda *a: fusedres.conv_bn_act(*a, **kwargs, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, fast_mode=backend == "triton")


def test_nan_and_inf_propagate_like_eager():
    tensors, kwargs = make_inputs(CASES["1x1"], torch.float32, "cpu")
    x = tensors[0].clone()
    x[0, :, 2, 3] = float("nan")
    x[1, 0, 4, 4] = float("inf")
    x[1, 1, 5, 5] = float("-inf")
    expected = _ref.conv_bn_act(x, *tensors[1:], (1, 1), (0, 0), (1, 1), 1, True)
    assert expected.isnan().any() and expected.isinf().any()
    for backend in fused_backends("cpu"):
        out = fusedres.conv_bn_act(x, *tensors[1:], **kwargs, backend=backend)
        assert torch.equal(out.isnan(), expected.isnan()), backend
        assert torch.equal(out.isinf(), expected.isinf()), backend
