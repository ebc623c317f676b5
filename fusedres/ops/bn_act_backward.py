"""``bn_act_backward``: gradient through the conv_bn_act epilogue, one pass plus channel sums.

``g = grad_out * act'(out)``; returns ``grad_conv = g * scale`` and ``grad_shift = sum(g)``
(``ConvBnActFunction`` gets the scale's gradient from the weight gradient). The C++ op
``fusedres::bn_act_backward`` (CPU and CUDA kernels) is declared in csrc/ops.cpp; the Triton
kernel is registered here as ``fusedres::bn_act_backward_triton``.
"""

from __future__ import annotations

import torch

from fusedres.ops._dispatch import op_for, register_fake_for_cpp, register_triton

_CL = torch.channels_last


def _fake(grad_out, out, scale, relu):
    k = grad_out.shape[1]
    acc_dtype = torch.promote_types(grad_out.dtype, torch.float32)
    grad_conv = torch.empty_like(grad_out, memory_format=_CL)
    grad_shift = grad_out.new_empty((k,), dtype=acc_dtype)
    return grad_conv, grad_shift


register_fake_for_cpp("bn_act_backward", _fake)


@torch.library.custom_op("fusedres::bn_act_backward_triton", mutates_args=())
def bn_act_backward_triton(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fusedres.triton import bn_act_backward as kernel

    return kernel.bn_act_backward(grad_out, out, scale, relu)


bn_act_backward_triton.register_fake(_fake)
register_triton("bn_act_backward", bn_act_backward_triton)


def bn_act_backward(grad_out, out, scale, relu: bool, backend: str):
    """Dispatches to the concrete ``backend`` ('native', 'triton' or 'reference')."""
    return op_for("bn_act_backward", backend)(grad_out, out, scale, relu)
