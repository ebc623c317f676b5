"""Eval convs on the CPU as one oneDNN call each: what inductor's freezing emits, without its compile.

``act(conv(x, W * scale) + shift [+ residual])`` runs as ``torch.ops.mkldnn._convolution_pointwise``
with the BN folded into a weight that is prepacked once (``_reorder_convolution_weight``: oneDNN's
blocked layout, so no reorder per call) and a bias in the input's dtype; ReLU is the unary
post-op, the residual add the binary post-op ``"add"`` followed by ``"relu"``. When the residual
is a temporary the caller owns, the add runs in place into it (``_convolution_pointwise_.binary``:
oneDNN's sum post-op, no output allocation).

Not differentiable: these are the inference steps of ``fusedres.nn.plan``; anything recording
autograd takes the fused ops of ``fusedres.ops.conv_bn_act``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

_CL = torch.channels_last


@functools.cache
def _bf16_supported() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def unusable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the oneDNN eval convs cannot run on this device and dtype, or None if they can."""
    if device.type != "cpu":
        return f"the oneDNN post-op convs run on the CPU, not on {device.type}"
    if not torch.backends.mkldnn.is_available():
        return "this torch was built without oneDNN (mkldnn)"
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16:
        return None if _bf16_supported() else "this CPU has no oneDNN bf16 convolutions (needs AVX512-BF16 or AMX)"
    return f"the oneDNN post-op convs take float32 and bfloat16 (bf16 where the CPU has it), not {dtype}"


def bf16_supported() -> bool:
    """True when oneDNN runs bf16 convolutions natively on this CPU."""
    return torch.backends.mkldnn.is_available() and _bf16_supported()


class PackedConv:
    """One conv with its BN folded in: prepacked weight, bias and geometry, ready to call.

    ``weight`` is the folded weight (any layout, any float dtype; computed in at least fp32),
    ``shift`` the per-channel shift; both are cast to ``dtype``. ``input_size`` picks oneDNN's
    weight layout (a weight packed for one batch size is correct at any other).
    """

    __slots__ = ("weight", "bias", "args", "add_in_place_only", "launch", "relu_launch", "add_relu_into_launch",
                 "add_relu_launch")

    def __init__(self, weight: torch.Tensor, shift: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, input_size: Sequence[int], dtype: torch.dtype) -> None:
        stride, padding, dilation = list(stride), list(padding), list(dilation)
        # A dense contiguous copy: oneDNN miscomputes grouped convs on weights whose size-1 dims
        # carry odd strides (see fusedres.ops._validate.canonical_layout).
        dense = weight.detach().to(dtype).clone(memory_format=torch.contiguous_format)
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(dense, padding, stride, dilation, groups,
                                                                  list(input_size))
        self.bias = shift.detach().to(dtype).contiguous()
        # The trailing arguments of every mkldnn conv call, in schema order.
        self.args = (self.weight, self.bias, padding, stride, dilation, groups)
        # torch 2.14.1: the out-of-place binary op on bf16 grouped convs takes an ATen fallback
        # without bf16 ("Unsupported datatype for add_relu"); the in-place one is fused.
        self.add_in_place_only = dtype == torch.bfloat16 and groups > 1
        # The launch plans' calls as (op, args) pairs, called op(x, *args) (add_relu_into_launch:
        # op(residual, x, *args), add_relu_launch: op(x, residual, *args)): no Python frame between
        # the plan and the op.
        conv = torch.ops.mkldnn._convolution_pointwise.default
        self.launch = (conv, (*self.args, "none", [], None))
        self.relu_launch = (conv, (*self.args, "relu", [], None))
        self.add_relu_into_launch = (torch.ops.mkldnn._convolution_pointwise_.binary,
                                     (*self.args, "add", None, "relu", [], None))
        self.add_relu_launch = ((self._add_relu_copy, ()) if self.add_in_place_only else
                                (torch.ops.mkldnn._convolution_pointwise.binary,
                                 (*self.args, "add", None, "relu", [], None)))

    def __call__(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        """``act(conv(x) + bias)``, channels_last like ``x``."""
        op, args = self.relu_launch if relu else self.launch
        return op(x, *args)

    def add_relu(self, x: torch.Tensor, residual: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``relu(conv(x) + bias + residual)``; ``inplace`` writes it into ``residual`` (which the
        caller must own: nothing else may read it afterwards) and returns it."""
        op, args = self.add_relu_into_launch
        if inplace:
            return op(residual, x, *args)
        op, args = self.add_relu_launch
        return op(x, residual, *args)

    def _add_relu_copy(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        op, args = self.add_relu_into_launch
        return op(residual.clone(memory_format=_CL), x, *args)
