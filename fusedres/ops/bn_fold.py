"""BatchNorm with running statistics folded into the preceding convolution.

``bn(conv(x, W) + b) == conv(x, W * scale) + (b * scale + shift)`` with ``scale = gamma /
sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``. Folding is K elements of
work, so it is plain (differentiable) PyTorch, not a kernel; the result is cached per conv and
recomputed as soon as any tensor it was computed from changes (in-place updates bump a
tensor's version, ``load_state_dict`` and ``.to()`` too).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fusedres.ops import _ref

_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]]" = (
    weakref.WeakKeyDictionary()
)


def _sources(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, ...]:
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return tuple(t for t in tensors if t is not None)


def _fold(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = _ref.fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    weight = (conv.weight.float() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    return weight, shift


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, shift)`` of ``bn(conv(.))`` as one conv with a per-channel fp32 shift.

    ``bn`` is any BatchNorm that normalises with running statistics (``nn.BatchNorm2d`` in eval,
    ``torchvision.ops.FrozenBatchNorm2d``). While autograd records, the fold is recomputed each
    call so gradients reach the conv weight and the BN affine parameters.
    """
    sources = _sources(conv, bn)
    records_grad = torch.is_grad_enabled() and any(t.requires_grad for t in sources)
    if records_grad or torch.compiler.is_compiling():
        return _fold(conv, bn)
    key = (
        tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources),
        torch.is_inference_mode_enabled(),
    )
    hit = _cache.get(conv)
    if hit is not None and hit[0] == key:
        return hit[1]
    folded = _fold(conv, bn)
    _cache[conv] = (key, folded)
    return folded
