"""``conv_bn_act`` alone, at every distinct conv shape of ResNet-50.

Modes: ``eval`` (forward under no_grad) and ``fwd+bwd`` (forward, then the gradients of the
input, the residual and every parameter; BN uses running statistics as in frozen-BN
fine-tuning). The eager competitor is conv2d + batch_norm(eval) + relu (+ add) in channels_last;
fusedres gets the BN as the per-channel (scale, shift) it folds to, computed once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fusedres
from bench import _harness, _resnet
from fusedres.ops import _ref

CL = torch.channels_last
MODES = ("eval", "fwd+bwd")


def conv_shapes(settings: _harness.Settings) -> dict[str, _resnet.ConvShape]:
    shapes = _resnet.conv_shapes("resnet50", settings.image_size)
    if settings.quick:  # the convs of one projection block: every kernel size, stride and epilogue
        shapes = [s for s in shapes if s.name.startswith("layer2.0.")]
    return {s.name: s for s in shapes}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = _harness.settings(metafunc.config)
    _harness.parametrize(metafunc, list(conv_shapes(settings)), MODES,
                         _harness.competitors(settings, with_cudnn_frontend=True))


class ConvBnAct(nn.Module):
    """The eager competitor: conv2d + batch_norm (eval) + relu (+ add)."""

    def __init__(self, shape: _resnet.ConvShape):
        super().__init__()
        self.conv = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding,
                              groups=shape.groups, bias=False)
        self.bn = nn.BatchNorm2d(shape.out_channels)
        self.relu = shape.relu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


def _inputs_maker(shape: _resnet.ConvShape, batch: int, dtype: torch.dtype, device: torch.device, backward: bool):
    """(x, residual or None[, grad_out]) in channels_last; x and residual require grad for backward."""
    p, q = shape.out_hw

    def activation(*size: int) -> torch.Tensor:
        t = torch.randn(batch, *size, device=device).to(dtype).contiguous(memory_format=CL)
        return t.requires_grad_(backward)

    def make() -> tuple:
        x = activation(shape.in_channels, shape.height, shape.width)
        residual = activation(shape.out_channels, p, q) if shape.residual else None
        if not backward:
            return x, residual
        return x, residual, activation(shape.out_channels, p, q).detach()

    return make


def _work(shape: _resnet.ConvShape, batch: int, dtype: torch.dtype, backward: bool) -> _harness.Work:
    """Forward: read x, W and the residual, write out (scale/shift are K floats each). Backward
    adds: read grad_out, out (ReLU mask), x and W; write grad_x, grad_W and grad_residual; two
    more GEMMs of the forward's size (dgrad, wgrad)."""
    size = torch.finfo(dtype).bits // 8
    p, q = shape.out_hw
    x = batch * shape.in_channels * shape.height * shape.width * size
    w = shape.out_channels * shape.in_channels // shape.groups * shape.kernel**2 * size
    out = batch * shape.out_channels * p * q * size
    residual = out if shape.residual else 0
    affine = 2 * shape.out_channels * 4
    forward = x + w + residual + out + affine
    if not backward:
        return _harness.Work(shape.flops(batch), forward)
    grad_out_and_mask, operands, grads = 2 * out, x + w, x + w + residual + affine
    return _harness.Work(3 * shape.flops(batch), forward + grad_out_and_mask + operands + grads)


def _conv_args(shape: _resnet.ConvShape) -> dict:
    return dict(stride=shape.stride, padding=shape.padding, dilation=1, groups=shape.groups)


@functools.cache
def _cudnn_handle():
    import cudnn

    return cudnn.create_handle()


def _cudnn_frontend_forward(shape: _resnet.ConvShape, weight, scale, shift, example: tuple):
    """The conv + scale + shift (+ residual) (+ ReLU) chain as one cuDNN frontend graph, or a
    skip when cuDNN has no engine for it."""
    import cudnn

    x, residual = example
    io_type = {torch.float32: cudnn.data_type.FLOAT, torch.float16: cudnn.data_type.HALF,
               torch.bfloat16: cudnn.data_type.BFLOAT16}[x.dtype]
    handle = _cudnn_handle()
    graph = cudnn.pygraph(io_data_type=io_type, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    scale4, shift4 = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
    ports = {
        "x": graph.tensor(name="x", dim=list(x.shape), stride=list(x.stride()), data_type=io_type),
        "w": graph.tensor(name="w", dim=list(weight.shape), stride=list(weight.stride()), data_type=io_type),
        "scale": graph.tensor(name="scale", dim=list(scale4.shape), stride=list(scale4.stride()),
                              data_type=cudnn.data_type.FLOAT),
        "shift": graph.tensor(name="shift", dim=list(shift4.shape), stride=list(shift4.stride()),
                              data_type=cudnn.data_type.FLOAT),
    }
    y = graph.conv_fprop(image=ports["x"], weight=ports["w"], padding=[shape.padding] * 2,
                         stride=[shape.stride] * 2, dilation=[1, 1], compute_data_type=cudnn.data_type.FLOAT)
    y = graph.add(a=graph.mul(a=y, b=ports["scale"]), b=ports["shift"])
    if residual is not None:
        ports["residual"] = graph.tensor(name="residual", dim=list(residual.shape), stride=list(residual.stride()),
                                         data_type=io_type)
        y = graph.add(a=y, b=ports["residual"])
    if shape.relu:
        y = graph.relu(input=y)
    y.set_output(True).set_data_type(io_type)
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
    except Exception as exc:  # cudnn raises its own error types for graphs it cannot run
        pytest.skip(f"the cuDNN frontend cannot run this graph: {exc}")
    workspace = torch.empty(graph.get_workspace_size(), device=x.device, dtype=torch.uint8)
    out_shape = (x.shape[0], shape.out_channels, *shape.out_hw)

    def forward(x, residual=None):
        out = torch.empty(out_shape, device=x.device, dtype=x.dtype, memory_format=CL)
        pack = {ports["x"]: x, ports["w"]: weight, ports["scale"]: scale4, ports["shift"]: shift4, y: out}
        if residual is not None:
            pack[ports["residual"]] = residual
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        graph.execute(pack, workspace, handle=handle)
        return out

    return forward


@dataclass
class OpCase:
    """A case and what its competitors are built from: the eager module and its BN folded."""

    case: _harness.Case
    module: ConvBnAct
    scale: torch.Tensor
    shift: torch.Tensor


def _build_case(case_name: str, mode: str, dtype_name: str, settings: _harness.Settings) -> OpCase:
    shape = conv_shapes(settings)[case_name]
    dtype, device = _harness.DTYPES[dtype_name], settings.device
    backward = mode == "fwd+bwd"
    module = ConvBnAct(shape)
    _resnet.randomize_batchnorm(module, torch.Generator().manual_seed(0))
    module = module.eval().to(device=device, dtype=dtype, memory_format=CL)
    bn = module.bn
    scale, shift = _ref.fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    scale, shift = scale.detach(), shift.detach()
    inputs = _harness.Rotation(_inputs_maker(shape, settings.batch, dtype, device, backward), device)

    ref_dtype = _harness.reference_dtype(device)
    x, residual, *grad_out = [None if t is None else t.detach().to(ref_dtype).requires_grad_(backward)
                              for t in inputs.first]
    with _harness.reference_math(), torch.set_grad_enabled(backward):
        out = _ref.conv_bn_act(x, module.conv.weight.detach().to(ref_dtype), scale.to(ref_dtype),
                               shift.to(ref_dtype), residual, (shape.stride,) * 2, (shape.padding,) * 2,
                               (1, 1), shape.groups, shape.relu)
        reference = (out, torch.autograd.grad(out, x, grad_out[0])[0]) if backward else (out,)
    reference = tuple(t.detach() for t in reference)
    with torch.set_grad_enabled(backward):
        eager = _harness.as_tuple(_call(module, list(module.parameters()), backward)(*inputs.first))
    case = _harness.Case(
        suite="ops", mode=mode, label=shape.label, dtype=dtype, batch=settings.batch, inference=not backward,
        inputs=inputs, expected=_harness.Expected(reference, _harness.max_error(eager, reference)),
        work=_work(shape, settings.batch, dtype, backward),
    )
    return OpCase(case, module, scale, shift)


cached_case = _harness.cached_case(_build_case)


def _call(forward, params: list[torch.Tensor], backward: bool):
    """The timed call: the forward, or the forward and every gradient (returning out, grad_x)."""
    if not backward:
        return forward

    def forward_backward(x, residual, grad_out):
        out = forward(x, residual)
        leaves = [x] + ([residual] if residual is not None else []) + params
        return out, torch.autograd.grad(out, leaves, grad_out)[0]

    return forward_backward


def test_conv_bn_act(benchmark, request, bench_settings, case_name, mode, dtype_name, competitor):
    dtype = _harness.DTYPES[dtype_name]
    reason = _harness.skip_reason(competitor, bench_settings.device, dtype)
    if reason is None and competitor == "cudnn-frontend" and mode != "eval":
        reason = "the cuDNN frontend graph is benchmarked for the eval forward only"
    if reason:
        pytest.skip(reason)
    prepared = cached_case(case_name, mode, dtype_name, bench_settings)
    shape = conv_shapes(bench_settings)[case_name]
    backward = mode == "fwd+bwd"
    module = prepared.module

    backend = _harness.fusedres_backend(competitor)
    if backend is not None:
        weight, scale, shift = (t.detach().requires_grad_(backward)
                                for t in (module.conv.weight, prepared.scale, prepared.shift))

        def forward(x, residual=None):
            return fusedres.conv_bn_act(x, weight, scale, shift, residual, relu=shape.relu, backend=backend,
                                        **_conv_args(shape))

        params = [weight, scale, shift]
    elif competitor == "cudnn-frontend":
        forward = _cudnn_frontend_forward(shape, module.conv.weight.detach(), prepared.scale, prepared.shift,
                                          prepared.case.inputs.first[:2])
        params = []
    elif competitor == "eager":
        forward, params = module, list(module.parameters())
    else:
        forward, params = _harness.compile_module(module, competitor), list(module.parameters())
    _harness.run(benchmark, request.config, prepared.case, competitor, _call(forward, params, backward))
