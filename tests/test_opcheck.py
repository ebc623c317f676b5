"""torch.library.opcheck on every registered op: schema, fake impl, autograd registration, AOT."""

from __future__ import annotations

import pytest
import torch

from fusedres import _extension, backends
from fusedres.ops._dispatch import kernel_for

CL = torch.channels_last


# The C++ op needs the extension; the Triton op a GPU or the interpreter.
OP_BACKENDS = (["native"] if _extension.loaded() else []) + (
    ["triton"] if backends.unusable_reason("triton", torch.device("cpu"), torch.float32) is None else []
)


def _overload(name: str, backend: str):
    op = kernel_for(name, backend)  # the registered op itself, not op_for's validating wrapper
    return op.default if backend == "native" else op._opoverload


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("optional", ["all", "none", "option_a"])
def test_opcheck_conv_bn_act(backend, optional):
    dev = _device()
    x = torch.randn(2, 6, 7, 7, device=dev).contiguous(memory_format=CL)
    w = torch.randn(4, 3, 3, 3, device=dev)
    residual_stride = 2 if optional == "option_a" else 1
    if optional == "none":
        extras = (None, None, None)
    else:  # option A: half the output's channels at x's 7x7, read every other pixel
        residual = torch.randn((2, 2, 7, 7) if optional == "option_a" else (2, 4, 4, 4), device=dev)
        extras = (torch.rand(4, device=dev), torch.randn(4, device=dev), residual)
    args = (x, w, *extras, [2, 2], [1, 1], [1, 1], 2, optional != "none", residual_stride)
    torch.library.opcheck(_overload("conv_bn_act", backend), args)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck_bn_act_backward(backend):
    dev = _device()
    shape = (2, 5, 3, 4)
    grad_out, out = (torch.randn(shape, device=dev).contiguous(memory_format=CL) for _ in range(2))
    torch.library.opcheck(_overload("bn_act_backward", backend), (grad_out, out, torch.rand(5, device=dev), True))


def _train_op_samples(dev: str) -> dict[str, tuple]:
    cl = dict(memory_format=CL)
    x = torch.randn(2, 6, 7, 7, device=dev).contiguous(**cl)
    w = torch.randn(4, 3, 3, 3, device=dev)
    y = torch.randn(2, 4, 5, 5, device=dev).contiguous(**cl)
    k = lambda: torch.rand(4, device=dev) + 0.5  # noqa: E731
    return {
        "conv_bn_stats": (x, w, torch.rand(6, device=dev), torch.randn(6, device=dev), [1, 1], [0, 0], [1, 1], 2),
        "bn_finalize": (torch.randn(4, device=dev), k() * 50, 50, k(), k(), torch.randn(4, device=dev), k(), 0.1, 1e-5),
        "bn_add_act": (y, k(), k(), torch.randn(2, 2, 9, 9, device=dev).contiguous(**cl), None, None, 2, True),
        "bn_backward_reduce": (torch.randn_like(y), y, k(), k(), None, k(), k()),
        "bn_backward_elemt": (torch.randn_like(y), y, k(), k(), k(), k(), k(), 50, torch.relu(y), None, None),
        # conv (6 -> 4 channels, 3x3, groups 2, stride 1, no padding) of x: 7x7 -> 5x5
        "conv_bn_backward": (torch.randn_like(y), y, torch.randn(4, 4, device=dev), x, w,
                             *(torch.rand(6, device=dev) + 0.5 for _ in range(4)), [1, 1], [0, 0], [1, 1], 2,
                             [True, True]),
    }


@pytest.mark.parametrize("name", ["conv_bn_stats", "bn_finalize", "bn_add_act", "bn_backward_reduce", "bn_backward_elemt",
                                  "conv_bn_backward"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck_train_ops(name, backend):
    torch.library.opcheck(_overload(name, backend), _train_op_samples(_device())[name])
