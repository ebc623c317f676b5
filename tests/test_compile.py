"""torch.compile sees every fused op: no graph breaks, same results, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fusedres
from tests.conftest import assert_matches_reference, fused_backends, randomize_batchnorm


# The Triton interpreter is too slow for a whole model; its op is covered by the block test below.
@pytest.mark.parametrize("backend", [b for b in fused_backends("cpu") if b != "triton"])
def test_converted_resnet_has_no_graph_breaks(backend):
    model = torchvision.models.resnet18()
    randomize_batchnorm(model)
    fused = fusedres.convert(copy.deepcopy(model), backend=backend).eval()
    x = torch.randn(1, 3, 32, 32)
    explanation = torch._dynamo.explain(fused)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_compiled_block_forward_backward_fullgraph(backend):
    block = torchvision.models.resnet.Bottleneck(
        16, 4, downsample=torch.nn.Sequential(torch.nn.Conv2d(16, 16, 1, bias=False), torch.nn.BatchNorm2d(16))
    )
    randomize_batchnorm(block)
    block.eval()
    fused = fusedres.convert(copy.deepcopy(block), backend=backend)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 7, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = compiled(x), block(x_ref)
    assert_matches_reference(out, expected.double(), torch.float32)
    out.sum().backward()
    expected.sum().backward()
    assert_matches_reference(x.grad, x_ref.grad.double(), torch.float32, what="grad of x")
    torch._dynamo.reset()


def test_inductor_compiles_converted_block():
    block = torchvision.models.resnet.BasicBlock(8, 8)
    randomize_batchnorm(block)
    block.eval()
    fused = fusedres.convert(copy.deepcopy(block), backend=fused_backends("cpu")[0])
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        out = torch.compile(fused, fullgraph=True)(x)
        assert_matches_reference(out, block(x).double(), torch.float32)
    torch._dynamo.reset()
