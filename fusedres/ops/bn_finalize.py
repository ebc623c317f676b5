"""``bn_finalize``: batch statistics -> ``(scale, shift, invstd)`` and the running-statistics
update of ``nn.BatchNorm2d`` (in place). K elements of work; see ``_ref.bn_finalize``."""

from __future__ import annotations

import torch

from fusedres.ops._dispatch import register_fake_for_cpp, register_triton


def _fake(mean, m2, count, weight, bias, running_mean, running_var, momentum, eps):
    return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)


register_fake_for_cpp("bn_finalize", _fake)


@torch.library.custom_op("fusedres::bn_finalize_triton", mutates_args=("running_mean", "running_var"))
def bn_finalize_triton(
    mean: torch.Tensor,
    m2: torch.Tensor,
    count: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedres.triton import bn_finalize as kernel

    return kernel.bn_finalize(mean, m2, count, weight, bias, running_mean, running_var, momentum, eps)


bn_finalize_triton.register_fake(_fake)
register_triton("bn_finalize", bn_finalize_triton)
