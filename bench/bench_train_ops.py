"""``conv_bn_backward`` alone, at every distinct conv shape of ResNet-50 but the stem.

Mode ``train-bwd``: the backward of one train-mode conv of a block, as the fused backward of
``fusedres.ops.residual_block`` calls it: dgrad + wgrad of the conv, with this layer's
BN-backward term ``grad_scale * (g - mean_g - (y - mean) * xhat_coef)`` applied to the
incoming gradient as a prologue and, for the convs whose input is the previous BN+ReLU (a block's conv2 and conv3), that BN+ReLU
recomputed on the input and the previous ReLU's mask and BN sums in the dgrad epilogue (case
label ``+bn-relu-in``). A block's conv1 and its projection conv read the block input, the
previous block's output, which no per-channel prologue recomputes: they run without it, as in
the blocks. The stem (7x7, its input is the image: no BN before it, no input gradient wanted)
is left out; fusedres never runs it through this op.

The eager competitor is ``fusedres.ops._ref.conv_bn_backward``: the BN-backward term and the
previous BN+ReLU materialised, ``aten.convolution_backward``, then the mask and the two sums
with plain torch ops. ``compile`` is ``torch.compile`` of that function. ``fusedres-auto`` is
skipped: this op has no auto dispatch; ``auto`` chooses per block between this fused backward
and ATen's GEMMs between the fused BN kernels, which the blocks suite's ``train`` mode measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from bench import _harness, _resnet
from fusedres.ops import _ref
from fusedres.ops._dispatch import op_for

CL = torch.channels_last
MODES = ("train-bwd",)
OUTPUT_MASK = [True, True]  # grad_input and grad_weight: inside a network both are needed
BN_EPS = 1e-5


def conv_shapes(settings: _harness.Settings) -> dict[str, _resnet.ConvShape]:
    # Convs inside blocks only: the stem's input is the image.
    shapes = [s for s in _resnet.conv_shapes("resnet50", settings.image_size) if s.name.startswith("layer")]
    if settings.quick:  # the convs of one projection block: with and without the input prologue
        shapes = [s for s in shapes if s.name.startswith("layer2.0.")]
    return {s.name: s for s in shapes}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = _harness.settings(metafunc.config)
    _harness.parametrize(metafunc, list(conv_shapes(settings)), MODES, _harness.competitors(settings))


def _prologue_in(shape: _resnet.ConvShape) -> bool:
    """Whether the conv's input is the previous BN+ReLU (recomputed in the op): every conv of a
    block but its first and the projection, which read the block input."""
    return not (shape.name.endswith(".conv1") or ".downsample." in shape.name)


def _label(shape: _resnet.ConvShape) -> str:
    p, q = shape.out_hw
    prologue = "+bn-relu-in" if _prologue_in(shape) else ""
    repeat = f" x{shape.count}" if shape.count > 1 else ""
    return (f"{shape.name} {shape.in_channels}x{shape.height}x{shape.width}->{shape.out_channels}x{p}x{q} "
            f"{shape.kernel}x{shape.kernel}/{shape.stride}{prologue}{repeat}")


def _inputs_maker(shape: _resnet.ConvShape, batch: int, dtype: torch.dtype, device: torch.device):
    """(grad, grad_y, x) in channels_last: the gradient after this BN's ReLU, this conv's raw
    output y (read by the BN-backward prologue) and the conv's input (the previous conv's raw
    output, or the block input)."""
    p, q = shape.out_hw

    def activation(*size: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        t = torch.randn(batch, *size, device=device) * std + mean
        return t.to(dtype).contiguous(memory_format=CL)

    def make() -> tuple:
        grad = activation(shape.out_channels, p, q)
        grad_y = activation(shape.out_channels, p, q, mean=1.0, std=2.0)
        x = activation(shape.in_channels, shape.height, shape.width, mean=1.0, std=2.0)
        return grad, grad_y, x

    return make


def _work(shape: _resnet.ConvShape, batch: int, dtype: torch.dtype) -> _harness.Work:
    """Two GEMMs of the forward's size (dgrad, wgrad); read grad, grad_y, x and W, write
    grad_input and grad_weight (the per-channel vectors are negligible)."""
    size = torch.finfo(dtype).bits // 8
    p, q = shape.out_hw
    x = batch * shape.in_channels * shape.height * shape.width * size
    w = shape.out_channels * shape.in_channels // shape.groups * shape.kernel**2 * size
    out = batch * shape.out_channels * p * q * size
    return _harness.Work(2 * shape.flops(batch), 2 * out + 2 * x + 2 * w)


def _batch_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (mean, m2, count) of ``t`` in fp32, as ``conv_bn_stats`` returns them."""
    acc = t.float()
    mean = acc.mean(dim=(0, 2, 3))
    return mean, (acc - mean.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3)), t.numel() // t.shape[1]


def _affine(channels: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """BN weight and bias drawn as ``_resnet.randomize_batchnorm`` draws them."""
    gamma = torch.rand(channels, generator=generator) + 0.5
    beta = torch.rand(channels, generator=generator) - 0.5
    return gamma.to(device), beta.to(device)


@dataclass
class BackwardCase:
    """A case and the operands of its calls that do not rotate: this BN's backward coefficients,
    the weight, the previous BN's (scale, shift, mean, invstd) or Nones, the conv geometry."""

    case: _harness.Case
    fixed: tuple
    checked: int  # outputs compared with the reference: the two sums only with the input prologue


def _call(fn, fixed: tuple):
    """The timed call on one input copy: ``fn`` with the op's signature on (grad, grad_y, x)."""
    coef, weight, scale_in, shift_in, mean_in, invstd_in, stride, padding, dilation, groups = fixed

    def backward(grad, grad_y, x):
        return fn(grad, grad_y, coef, x, weight, scale_in, shift_in, mean_in, invstd_in, stride, padding,
                  dilation, groups, OUTPUT_MASK)

    return backward


def _checked_outputs(call, checked: int):
    """The outputs to check: without the input prologue the two sums are empty."""
    return lambda *inputs: call(*inputs)[:checked]


def _build_case(case_name: str, mode: str, dtype_name: str, settings: _harness.Settings) -> BackwardCase:
    shape = conv_shapes(settings)[case_name]
    dtype, device = _harness.DTYPES[dtype_name], settings.device
    generator = torch.Generator().manual_seed(0)
    inputs = _harness.Rotation(_inputs_maker(shape, settings.batch, dtype, device), device)
    grad, grad_y, x = inputs.first

    fan_in = shape.in_channels // shape.groups * shape.kernel**2
    weight = (torch.randn(shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel,
                          generator=generator) / fan_in**0.5)
    weight = weight.to(device=device, dtype=dtype).contiguous(memory_format=CL)
    # This BN's backward on the first input copy: its batch statistics and the two sums of grad.
    mean, m2, count = _batch_stats(grad_y)
    gamma, _ = _affine(shape.out_channels, generator, device)  # this BN's bias has no part in its backward
    invstd = torch.rsqrt(m2 / count + BN_EPS)
    sum_g, sum_g_xhat = _ref.bn_backward_reduce(grad, grad_y, mean, invstd, None, None, None)
    coef = _ref.bn_backward_coef(mean, invstd, gamma, sum_g, sum_g_xhat, count)
    prologue_vectors = (None,) * 4
    if _prologue_in(shape):  # the previous BN, finalised from x's batch statistics
        mean_in, m2_in, count_in = _batch_stats(x)
        gamma_in, beta_in = _affine(shape.in_channels, generator, device)
        scale_in, shift_in, invstd_in = _ref.bn_finalize(mean_in, m2_in, count_in, gamma_in, beta_in, None, None,
                                                         0.1, BN_EPS)
        prologue_vectors = (scale_in, shift_in, mean_in, invstd_in)
    conv = ((shape.stride,) * 2, (shape.padding,) * 2, (1, 1), shape.groups)
    fixed, checked = (coef, weight, *prologue_vectors, *conv), 4 if _prologue_in(shape) else 2

    ref_dtype = _harness.reference_dtype(device)
    ref_args = [None if t is None else t.to(ref_dtype) for t in (grad, grad_y, coef, x, weight, *prologue_vectors)]
    with _harness.reference_math():
        reference = _ref.conv_bn_backward(*ref_args, *conv, OUTPUT_MASK)[:checked]
    eager = _checked_outputs(_call(_ref.conv_bn_backward, fixed), checked)(*inputs.first)
    case = _harness.Case(
        suite="ops", mode=mode, label=_label(shape), dtype=dtype, batch=settings.batch, inference=False,
        inputs=inputs, expected=_harness.Expected(reference, _harness.max_error(eager, reference)),
        work=_work(shape, settings.batch, dtype),
    )
    return BackwardCase(case, fixed, checked)


cached_case = _harness.cached_case(_build_case)


def test_conv_bn_backward(benchmark, request, bench_settings, case_name, mode, dtype_name, competitor):
    reason = _harness.skip_reason(competitor, bench_settings.device, _harness.DTYPES[dtype_name])
    if reason is None and competitor == "fusedres-auto":
        reason = ("conv_bn_backward has no auto dispatch: auto picks per block between it and ATen's GEMMs "
                  "(see the blocks suite's train mode)")
    if reason:
        pytest.skip(reason)
    prepared = cached_case(case_name, mode, dtype_name, bench_settings)

    backend = _harness.fusedres_backend(competitor)
    if backend is not None:
        fn = op_for("conv_bn_backward", backend)
    elif competitor == "eager":
        fn = _ref.conv_bn_backward
    else:
        fn = _harness.compile_module(_ref.conv_bn_backward, competitor)
    call = _call(fn, prepared.fixed)
    _harness.run(benchmark, request.config, prepared.case, competitor, call,
                 outputs=_checked_outputs(call, prepared.checked))
