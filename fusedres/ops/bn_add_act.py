"""``bn_add_act``: a residual block's last launch, ``act(y*scale + shift + shortcut_term)``.

``shortcut_term`` is the block input, ``yd*sd + bd`` for a projection shortcut (its BN in the
same pass), the paper's option A (strided, zero-extended channels), or nothing; see
``_ref.bn_add_act``.
"""

from __future__ import annotations

import torch

from fusedres.ops._dispatch import register_fake_for_cpp, register_triton


def _fake(y, scale, shift, shortcut, shortcut_scale, shortcut_shift, shortcut_stride, relu):
    return torch.empty_like(y, memory_format=torch.channels_last)


register_fake_for_cpp("bn_add_act", _fake)


@torch.library.custom_op("fusedres::bn_add_act_triton", mutates_args=())
def bn_add_act_triton(
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    shortcut: torch.Tensor | None,
    shortcut_scale: torch.Tensor | None,
    shortcut_shift: torch.Tensor | None,
    shortcut_stride: int,
    relu: bool,
) -> torch.Tensor:
    from fusedres.triton import bn_add_act as kernel

    return kernel.bn_add_act(y, scale, shift, shortcut, shortcut_scale, shortcut_shift, shortcut_stride, relu)


bn_add_act_triton.register_fake(_fake)
register_triton("bn_add_act", bn_add_act_triton)
