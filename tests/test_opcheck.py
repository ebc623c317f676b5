"""torch.library.opcheck on every registered op: schema, fake impl, autograd registration, AOT."""

from __future__ import annotations

import pytest
import torch

from fusedres import _extension, backends
from fusedres.ops.bn_act_backward import bn_act_backward_triton
from fusedres.ops.conv_bn_act import conv_bn_act_triton

CL = torch.channels_last


def _ops(cpp_name: str, triton_op):
    params = []
    if _extension.loaded():
        params.append(pytest.param(lambda: getattr(torch.ops.fusedres, cpp_name).default, id="cuda"))
    if backends.unusable_reason("triton", torch.device("cpu"), torch.float32) is None:
        params.append(pytest.param(lambda: triton_op._opoverload, id="triton"))
    return params


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("get_op", _ops("conv_bn_act", conv_bn_act_triton))
@pytest.mark.parametrize("optional", ["all", "none"])
def test_opcheck_conv_bn_act(get_op, optional):
    dev = _device()
    x = torch.randn(2, 6, 7, 7, device=dev).contiguous(memory_format=CL)
    w = torch.randn(4, 3, 3, 3, device=dev)
    if optional == "all":
        extras = (torch.rand(4, device=dev), torch.randn(4, device=dev), torch.randn(2, 4, 4, 4, device=dev))
    else:
        extras = (None, None, None)
    args = (x, w, *extras, [2, 2], [1, 1], [1, 1], 2, optional == "all")
    torch.library.opcheck(get_op(), args)


@pytest.mark.parametrize("get_op", _ops("bn_act_backward", bn_act_backward_triton))
@pytest.mark.parametrize("with_conv_out", [True, False])
def test_opcheck_bn_act_backward(get_op, with_conv_out):
    dev = _device()
    shape = (2, 5, 3, 4)
    grad_out, out = (torch.randn(shape, device=dev).contiguous(memory_format=CL) for _ in range(2))
    conv_out = torch.randn(shape, device=dev) if with_conv_out else None
    torch.library.opcheck(get_op(), (grad_out, out, torch.rand(5, device=dev), conv_out, True))
