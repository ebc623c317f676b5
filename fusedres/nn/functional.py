"""Module-level glue: run a (conv, BatchNorm) pair of a block through the fused op."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fusedres.ops import conv_bn_act, fold_conv_bn

_warned: set[str] = set()


def _frozen_bn_types() -> tuple[type, ...]:
    try:
        from torchvision.ops import FrozenBatchNorm2d
    except ImportError:
        return ()
    return (FrozenBatchNorm2d,)


def bn_uses_running_stats(bn: nn.Module) -> bool:
    """True when ``bn`` normalises with its running statistics, i.e. is a per-channel affine."""
    if isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return not bn.training and bn.track_running_stats and bn.running_mean is not None
    return isinstance(bn, _frozen_bn_types())


def unfusable_reason(conv: nn.Module, bn: nn.Module) -> str | None:
    """Why (conv, bn) cannot be folded into one conv_bn_act, or None when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (give explicit padding to fuse)"
    if not bn_uses_running_stats(bn):
        return "BatchNorm normalises with batch statistics (train mode)"
    return None


def warn_unfusable_once(block: nn.Module, reason: str) -> None:
    key = f"{type(block).__name__}: {reason}"
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(f"fusedres: {key}; running this block unfused", stacklevel=3)


def conv_bn(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.Module,
    relu: bool,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(bn(conv(x)) [+ residual])`` as one fused launch with the BN folded into the conv."""
    weight, shift = fold_conv_bn(conv, bn)
    return conv_bn_act(
        x, weight, None, shift, residual,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        relu=relu, backend=backend,
    )
