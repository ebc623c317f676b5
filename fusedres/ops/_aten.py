"""ATen calls the fused ops' backward makes, routed around bugs of the torch release in use."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def convolution_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_input, grad_weight)`` of ``conv2d(x, weight)`` (no bias, not transposed), each
    None-free: an output not asked for is whatever ATen returns (undefined or empty).

    torch 2.14's CPU (oneDNN) weight gradient of a strided 1x1 conv corrupts the heap when ``x``
    or ``weight`` has channels_last strides (``free(): invalid pointer`` within a few hundred
    calls): that case runs on dense NCHW copies, same math. A 1x1 weight passes
    ``is_contiguous()`` with channels_last strides too, hence ``clone``, not ``contiguous``.
    """
    if output_mask[1] and x.device.type == "cpu" and tuple(weight.shape[2:]) == (1, 1) and max(stride) > 1:
        x, weight = _dense_nchw(x), _dense_nchw(weight)
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [bool(output_mask[0]), bool(output_mask[1]), False],
    )
    return grad_input, grad_weight


def _dense_nchw(t: torch.Tensor) -> torch.Tensor:
    n, c, h, w = t.shape
    if t.stride() == (c * h * w, h * w, w, 1):
        return t
    return t.clone(memory_format=torch.contiguous_format)
