"""``conv_bn_stats``: conv with the previous BN+ReLU applied as its input is loaded (prologue) and
the per-channel batch statistics of its output accumulated in its epilogue (train mode).

Returns ``(y, mean, m2)``; see ``_ref.conv_bn_stats``. C++ op declared in csrc/ops.cpp; the
Triton kernel is ``fusedres::conv_bn_stats_triton``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedres.ops._dispatch import register_fake_for_cpp, register_triton

_CL = torch.channels_last


def _fake(x, weight, scale_in, shift_in, stride, padding, dilation, groups):
    n, k = x.shape[0], weight.shape[0]
    p = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    q = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    y = torch.empty((n, k, p, q), dtype=x.dtype, device=x.device, memory_format=_CL)
    acc = torch.promote_types(x.dtype, torch.float32)
    return y, x.new_empty((k,), dtype=acc), x.new_empty((k,), dtype=acc)


register_fake_for_cpp("conv_bn_stats", _fake)


@torch.library.custom_op("fusedres::conv_bn_stats_triton", mutates_args=())
def conv_bn_stats_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_in: torch.Tensor | None,
    shift_in: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedres.triton import conv_bn_stats as kernel

    return kernel.conv_bn_stats(x, weight, scale_in, shift_in, stride, padding, dilation, groups)


conv_bn_stats_triton.register_fake(_fake)
register_triton("conv_bn_stats", conv_bn_stats_triton)
