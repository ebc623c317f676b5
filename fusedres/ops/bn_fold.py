"""BatchNorm with running statistics folded into the preceding convolution.

``bn(conv(x, W) + b) == conv(x, W * scale) + (b * scale + shift)`` with ``scale = gamma /
sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``. Folding is K elements of
work, so it is plain (differentiable) PyTorch, not a kernel. It is computed in fp32, or in
float64 for a float64 weight. The result is cached per conv and recomputed as soon as anything
it was computed from changes: a tensor's identity, storage or version (in-place updates bump it,
``load_state_dict`` and ``.to()`` too) or ``eps``.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]]" = (
    weakref.WeakKeyDictionary()
)


def _sources(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor | None, ...]:
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def fold_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The precision a fold is computed in: fp32, float64 for a float64 weight."""
    return torch.promote_types(weight_dtype, torch.float32)


def fold(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, shift)`` of ``bn(conv(.))``, uncached, both in ``fold_dtype(conv.weight.dtype)``."""
    acc = fold_dtype(conv.weight.dtype)
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    if conv.bias is not None:
        shift = shift + conv.bias.to(acc) * scale
    return conv.weight.to(acc) * scale.view(-1, 1, 1, 1), shift


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, shift)`` of ``bn(conv(.))`` as one conv: the weight in the conv's dtype, the
    per-channel shift in ``fold_dtype`` (fp32, float64 for float64 weights).

    ``bn`` is any BatchNorm that normalises with running statistics (``nn.BatchNorm2d`` in eval,
    ``torchvision.ops.FrozenBatchNorm2d``). While autograd records, the fold is recomputed each
    call so gradients reach the conv weight and the BN affine parameters.
    """
    sources = _sources(conv, bn)
    records_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)
    if records_grad or torch.compiler.is_compiling():
        weight, shift = fold(conv, bn)
        return weight.to(conv.weight.dtype), shift
    key = (
        tuple(None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources),
        bn.eps,
        torch.is_inference_mode_enabled(),
    )
    hit = _cache.get(conv)
    if hit is not None and hit[0] == key:
        return hit[1]
    weight, shift = fold(conv, bn)
    folded = (weight.to(conv.weight.dtype), shift)
    # The key holds ids: keep the sources alive with it so no new tensor can reuse one.
    _cache[conv] = (key, folded, sources)
    return folded
