"""Train-mode BatchNorm(+ReLU) backward as two passes: ``bn_backward_reduce`` (the per-channel
sums ``sum(g)``, ``sum(g*xhat)``) and ``bn_backward_elemt`` (the input gradient). The ReLU mask
comes from the saved block output or is recomputed from the raw conv output; nothing else is
saved. See ``_ref.bn_backward_reduce`` / ``_ref.bn_backward_elemt``.
"""

from __future__ import annotations

import torch

from fusedres.ops._dispatch import register_fake_for_cpp, register_triton


def _fake_reduce(grad, y, mean, invstd, act_out, act_scale, act_shift):
    acc = torch.promote_types(y.dtype, torch.float32)
    k = y.shape[1]
    return y.new_empty((k,), dtype=acc), y.new_empty((k,), dtype=acc)


def _fake_elemt(grad, y, mean, invstd, weight, sum_g, sum_g_xhat, count, act_out, act_scale, act_shift):
    return torch.empty_like(y, memory_format=torch.channels_last)


register_fake_for_cpp("bn_backward_reduce", _fake_reduce)
register_fake_for_cpp("bn_backward_elemt", _fake_elemt)


@torch.library.custom_op("fusedres::bn_backward_reduce_triton", mutates_args=())
def bn_backward_reduce_triton(
    grad: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    act_out: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_shift: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fusedres.triton import bn_backward as kernel

    return kernel.bn_backward_reduce(grad, y, mean, invstd, act_out, act_scale, act_shift)


@torch.library.custom_op("fusedres::bn_backward_elemt_triton", mutates_args=())
def bn_backward_elemt_triton(
    grad: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_g: torch.Tensor,
    sum_g_xhat: torch.Tensor,
    count: int,
    act_out: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_shift: torch.Tensor | None,
) -> torch.Tensor:
    from fusedres.triton import bn_backward as kernel

    return kernel.bn_backward_elemt(grad, y, mean, invstd, weight, sum_g, sum_g_xhat, count, act_out, act_scale, act_shift)


bn_backward_reduce_triton.register_fake(_fake_reduce)
bn_backward_elemt_triton.register_fake(_fake_elemt)
register_triton("bn_backward_reduce", bn_backward_reduce_triton)
register_triton("bn_backward_elemt", bn_backward_elemt_triton)
