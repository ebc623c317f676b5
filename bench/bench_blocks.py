"""Single residual blocks: Bottleneck at each ResNet-50 stage, BasicBlock at each ResNet-18 stage
(each stage's first block, which projects where the shape changes, and an identity block).

Modes: ``eval`` (forward under no_grad; fusedres folds every BN into its conv) and ``train``
(BatchNorm on batch statistics; forward, then the gradients of the input and every parameter).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bench import _harness, _resnet

CL = torch.channels_last
MODES = ("eval", "train")


def block_shapes(settings: _harness.Settings) -> dict[str, _resnet.BlockShape]:
    shapes = _resnet.block_shapes("resnet50", settings.image_size) + _resnet.block_shapes("resnet18", settings.image_size)
    if settings.quick:  # one stage: a projecting and an identity block of each kind
        shapes = tuple(s for s in shapes if s.name.startswith("layer2."))
    return {f"{s.arch}.{s.name}": s for s in shapes}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = _harness.settings(metafunc.config)
    _harness.parametrize(metafunc, list(block_shapes(settings)), MODES, _harness.competitors(settings))


def _call(block: nn.Module, train: bool):
    """The timed call: the forward, or the forward and every gradient (returning out, grad_x)."""
    if not train:
        return block
    params = list(block.parameters())

    def forward_backward(x, grad_out):
        out = block(x)
        return out, torch.autograd.grad(out, [x] + params, grad_out)[0]

    return forward_backward


@dataclass
class BlockCase:
    case: _harness.Case
    block: nn.Module  # the eager block every competitor starts from


def _build_case(case_name: str, mode: str, dtype_name: str, settings: _harness.Settings) -> BlockCase:
    shape = block_shapes(settings)[case_name]
    dtype, device = _harness.DTYPES[dtype_name], settings.device
    train = mode == "train"
    block = _resnet.build_block(shape).train(train)
    meta = _resnet.meta_forward(block, (settings.batch, shape.in_channels, shape.height, shape.width))

    def make_inputs() -> tuple:
        x = torch.randn(settings.batch, shape.in_channels, shape.height, shape.width, device=device)
        x = x.to(dtype).contiguous(memory_format=CL).requires_grad_(train)
        if not train:
            return (x,)
        return x, torch.randn(meta.output_shape, device=device).to(dtype).contiguous(memory_format=CL)

    inputs = _harness.Rotation(make_inputs, device)
    ref_dtype = _harness.reference_dtype(device)
    reference_block = copy.deepcopy(block).to(device=device, dtype=ref_dtype, memory_format=CL)
    block = block.to(device=device, dtype=dtype, memory_format=CL)
    ref_inputs = tuple(t.detach().to(ref_dtype).requires_grad_(train) for t in inputs.first)
    with _harness.reference_math(), torch.set_grad_enabled(train):
        reference = tuple(t.detach() for t in _harness.as_tuple(_call(reference_block, train)(*ref_inputs)))
        eager = _harness.as_tuple(_call(block, train)(*inputs.first))

    x_bytes = _harness.tensor_bytes(inputs.first[:1])
    out_bytes = math.prod(meta.output_shape) * inputs.first[0].element_size()
    forward_bytes = x_bytes + _harness.state_bytes(block) + out_bytes
    if train:
        # Backward adds: read grad_out, write grad_x and every parameter's gradient.
        grads = out_bytes + x_bytes + _harness.tensor_bytes(list(block.parameters()))
        work = _harness.Work(3 * meta.flops, forward_bytes + grads)
    else:
        work = _harness.Work(meta.flops, forward_bytes)
    case = _harness.Case(
        suite="blocks", mode=mode, label=shape.label, dtype=dtype, batch=settings.batch, inference=not train,
        inputs=inputs, expected=_harness.Expected(reference, _harness.max_error(eager, reference)), work=work,
    )
    return BlockCase(case, block)


cached_case = _harness.cached_case(_build_case)


def test_block(benchmark, request, bench_settings, case_name, mode, dtype_name, competitor):
    reason = _harness.skip_reason(competitor, bench_settings.device, _harness.DTYPES[dtype_name])
    if reason:
        pytest.skip(reason)
    prepared = cached_case(case_name, mode, dtype_name, bench_settings)
    block = _harness.module_for(competitor, prepared.block)
    _harness.run(benchmark, request.config, prepared.case, competitor, _call(block, mode == "train"))
