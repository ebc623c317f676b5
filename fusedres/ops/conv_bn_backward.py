"""``conv_bn_backward``: the backward convs of a train-mode layer with BatchNorm backward fused
around them (DESIGN.md §2, "Backward mirrors it").

- Prologue of both GEMMs: the gradient of the conv output is this layer's BN backward,
  ``grad_scale * (g - mean_g - (y - mean) * xhat_coef)`` with the per-channel constants of
  ``bn_backward_coef``, computed as tiles are loaded; ``dy`` is never written.
- wgrad recomputes the previous BN+ReLU ``relu(x*scale_in + shift_in)`` as it loads ``x``.
- dgrad's epilogue applies the previous ReLU's mask and reduces that BN's two backward sums
  ``sum(g)``, ``sum(g*xhat)`` per channel (partials merged in a fixed order: deterministic).

Returns ``(grad_input, grad_weight, sum_g, sum_g_xhat)``; see ``_ref.conv_bn_backward``. C++ op
declared in csrc/ops.cpp; the Triton kernels are ``fusedres::conv_bn_backward_triton``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedres.ops import _ref
from fusedres.ops._dispatch import register_fake_for_cpp, register_triton

bn_backward_coef = _ref.bn_backward_coef  # K values: plain PyTorch on every backend


def _fake(grad, grad_y, grad_coef, x, weight, scale_in, shift_in, mean_in, invstd_in, stride, padding,
          dilation, groups, output_mask):
    acc = torch.promote_types(x.dtype, torch.float32)
    with_sums = bool(output_mask[0]) and scale_in is not None
    c = x.shape[1] if with_sums else 0
    grad_input = (torch.empty_like(x, memory_format=torch.channels_last) if output_mask[0]
                  else x.new_empty(0))
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else weight.new_empty(0)
    return grad_input, grad_weight, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


register_fake_for_cpp("conv_bn_backward", _fake)


@torch.library.custom_op("fusedres::conv_bn_backward_triton", mutates_args=())
def conv_bn_backward_triton(
    grad: torch.Tensor,
    grad_y: torch.Tensor | None,
    grad_coef: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_in: torch.Tensor | None,
    shift_in: torch.Tensor | None,
    mean_in: torch.Tensor | None,
    invstd_in: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedres.triton import conv_bn_backward as kernel

    return kernel.conv_bn_backward(grad, grad_y, grad_coef, x, weight, scale_in, shift_in, mean_in,
                                   invstd_in, stride, padding, dilation, groups, output_mask)


conv_bn_backward_triton.register_fake(_fake)
register_triton("conv_bn_backward", conv_bn_backward_triton)
