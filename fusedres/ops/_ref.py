"""Unfused PyTorch references: the ground truth for every fused op.

Same math as the kernels, written with plain ops and no tricks. Tests and benchmarks import
these; the ``reference`` backend runs them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation type: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
) -> torch.Tensor:
    """``act(conv(x, weight) * scale + shift + residual)``; absent operands are 1 / 0 / 0.

    The affine is computed in fp32 and rounded once to ``x.dtype`` at the end, like the kernels.
    """
    acc = _acc_dtype(x.dtype)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups).to(acc)
    if scale is not None:
        y = y * _per_channel(scale.to(acc))
    if shift is not None:
        y = y + _per_channel(shift.to(acc))
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def bn_act_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    scale: Optional[torch.Tensor],
    conv_out: Optional[torch.Tensor],
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the epilogue ``out = act(conv_out * scale + shift + residual)``.

    Returns ``(grad_conv, grad_shift, grad_scale)``: ``g = grad_out * act'(out)``,
    ``grad_conv = g * scale`` (in the dtype of ``grad_out``), ``grad_shift = sum(g)`` and
    ``grad_scale = sum(g * conv_out)`` over N, H, W in fp32; ``grad_scale`` is empty when
    ``conv_out`` is None. ``g`` is also the residual's gradient.
    """
    acc = _acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    if relu:
        g = torch.where(out > 0, g, torch.zeros_like(g))
    grad_shift = g.sum(dim=(0, 2, 3))
    if conv_out is not None:
        grad_scale = (g * conv_out.to(acc)).sum(dim=(0, 2, 3))
    else:
        grad_scale = g.new_empty(0)
    grad_conv = g * _per_channel(scale.to(acc)) if scale is not None else g
    grad_conv = grad_conv.to(grad_out.dtype).contiguous(memory_format=torch.channels_last)
    return grad_conv, grad_shift, grad_scale


def fold_bn(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm with running statistics as a per-channel affine: ``(scale, shift)`` in fp32."""
    scale = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -running_mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift
