"""Eval 3x3 convs on the CPU as Winograd F(2x2, 3x3): 2.25x fewer multiply-adds than a direct conv.

``act(conv3x3(x, W) + bias [+ residual])`` (stride 1, padding 1, fp32, channels_last) runs as
``fusedres::winograd_conv_act`` (csrc/winograd/winograd.cpp): per block of 2x2 output tiles an
input transform ``B^T d B``, 16 GEMMs against the transformed weight ``U = G W G^T`` and an output
transform ``A^T m A`` with the bias, residual and ReLU, all in cache. ``winograd_conv_act_``
writes the result into the residual it reads (the block's last conv, in place into the shortcut)
and returns nothing.

The error against a float64 conv is at most 1.6x a direct fp32 conv's, 0.6x at ResNet's sizes
(tests/test_winograd.py holds it to 2x); F(4x4, 3x3) would save more FLOPs but costs 9-28x, so it
is not offered.

Not differentiable: like ``fusedres.ops.onednn``, these are inference steps of the launch plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedres import _extension
from fusedres.ops._dispatch import register_fake_for_cpp

_CL = torch.channels_last

# F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G W G^T) * (B^T d B)] A for a 4x4 patch d. B and A
# (only 0 and +-1) live in the kernel; G here, applied in float64 so that U is rounded once.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


# The kernel's GEMMs read the transformed weight's output channels in panels of this many
# (kPanel in csrc/winograd/winograd.cpp).
PANEL = 64


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``U = G W G^T`` of a (K, C, 3, 3) weight, computed in float64 and returned in float32 as
    the kernel reads it: (4, 4, ceil(K / 64), C, 64), entry-major, the output channels in
    contiguous panels of 64 (the last one padded with zeros)."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"transform_weight: weight must be (K, C, 3, 3), got {tuple(weight.shape)}")
    k, c = weight.shape[:2]
    panels = -(-k // PANEL)
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ar,kcrs,bs->abck", g, weight.detach().to(torch.float64), g).to(torch.float32)
    u = torch.nn.functional.pad(u, (0, panels * PANEL - k))
    return u.view(4, 4, c, panels, PANEL).transpose(2, 3).contiguous()


def unusable_reason(kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a conv with this geometry cannot run as ``winograd_conv_act``, or None if it can."""
    if device.type != "cpu":
        return f"the Winograd convs run on the CPU, not on {device.type}"
    if not _extension.loaded():
        return f"the compiled extension is not loaded ({_extension.LOAD_ERROR})"
    if not _built():
        return "the compiled extension was built without the Winograd ops: rebuild it"
    if dtype != torch.float32:
        return f"the Winograd convs take float32, not {dtype}"
    if tuple(kernel_size) != (3, 3):
        return f"Winograd F(2x2, 3x3) takes 3x3 kernels, not {tuple(kernel_size)}"
    if tuple(stride) != (1, 1) or tuple(padding) != (1, 1) or tuple(dilation) != (1, 1):
        return (f"Winograd F(2x2, 3x3) takes stride 1, padding 1 and dilation 1, got stride {tuple(stride)}, "
                f"padding {tuple(padding)}, dilation {tuple(dilation)}")
    if groups != 1:
        return f"Winograd F(2x2, 3x3) takes groups=1, got {groups}"
    return None


def _fake(x, weight_t, bias, residual, relu):
    # K is the bias's (weight_t's output channels are padded to whole panels).
    return torch.empty((x.shape[0], bias.shape[0], x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                       memory_format=_CL)


def _fake_inplace(residual, x, weight_t, bias, relu):
    return None


def _built() -> bool:
    """The loaded extension has the ops (one built before them has not)."""
    return _extension.loaded() and hasattr(torch.ops.fusedres, "winograd_conv_act")


if _built():
    register_fake_for_cpp("winograd_conv_act", _fake)
    register_fake_for_cpp("winograd_conv_act_", _fake_inplace)


def _add_relu_into(residual: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor,
                   relu: bool) -> torch.Tensor:
    """``winograd_conv_act_`` returning the residual it wrote, as the launch plans expect (the op
    itself returns nothing: torch.compile cannot functionalize a custom op that returns an alias),
    with the residual's version bumped (a C++ custom op's in-place write does not)."""
    torch.ops.fusedres.winograd_conv_act_.default(residual, x, weight_t, bias, relu)
    torch.autograd.graph.increment_version(residual)
    return residual


class PackedWinograd:
    """One 3x3 stride-1 conv with its BN folded in, as Winograd: transformed weight and bias.

    The same interface as ``fusedres.ops.onednn.PackedConv`` (whose constructor arguments it
    takes, checking them with :func:`unusable_reason`; ``input_size`` is unused), so that a launch
    plan can hold either.
    """

    __slots__ = ("weight_t", "bias", "launch", "relu_launch", "add_relu_into_launch", "add_relu_launch")

    def __init__(self, weight: torch.Tensor, shift: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, input_size: Sequence[int], dtype: torch.dtype) -> None:
        reason = unusable_reason(weight.shape[2:], stride, padding, dilation, groups, dtype, weight.device)
        if reason is not None:
            raise ValueError(f"PackedWinograd: {reason}")
        self.weight_t = transform_weight(weight)
        self.bias = shift.detach().to(torch.float32).contiguous()
        # The launch plans' calls as (op, args) pairs, as PackedConv's (channels_last inputs).
        op = torch.ops.fusedres.winograd_conv_act.default
        self.launch = (op, (self.weight_t, self.bias, None, False))
        self.relu_launch = (op, (self.weight_t, self.bias, None, True))
        self.add_relu_into_launch = (_add_relu_into, (self.weight_t, self.bias, True))
        self.add_relu_launch = (self._add_relu_out, ())

    def __call__(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        """``act(conv(x) + bias)``, channels_last."""
        return torch.ops.fusedres.winograd_conv_act.default(x.contiguous(memory_format=_CL), self.weight_t,
                                                            self.bias, None, relu)

    def add_relu(self, x: torch.Tensor, residual: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``relu(conv(x) + bias + residual)``; ``inplace`` writes it into ``residual`` (which the
        caller must own and which must be channels_last) and returns it."""
        x = x.contiguous(memory_format=_CL)
        if inplace:
            return _add_relu_into(residual, x, self.weight_t, self.bias, True)
        return torch.ops.fusedres.winograd_conv_act.default(x, self.weight_t, self.bias,
                                                            residual.contiguous(memory_format=_CL), True)

    def _add_relu_out(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.add_relu(x, residual, False)
