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
    return bn_mode(bn) == "running"


def bn_mode(bn: nn.Module) -> str | None:
    """'running' (eval-mode BN, FrozenBatchNorm2d: foldable into the conv), 'batch' (normalises
    with batch statistics: the train-mode fused path) or None (not a BatchNorm we fuse)."""
    if isinstance(bn, nn.BatchNorm2d):
        uses_batch = bn.training or not bn.track_running_stats or bn.running_mean is None
        return "batch" if uses_batch else "running"
    if isinstance(bn, nn.SyncBatchNorm):
        # Train mode: batch statistics, all-gathered across the process group by the block.
        return "running" if not bn.training and bn.track_running_stats else "batch"
    return "running" if isinstance(bn, _frozen_bn_types()) else None


def unfusable_reason(conv: nn.Module, bn: nn.Module, mode: str = "running") -> str | None:
    """Why (conv, bn) cannot run fused with ``bn`` in ``mode``, or None when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (give explicit padding to fuse)"
    if mode == "batch" and conv.bias is not None:
        return "a conv bias before a train-mode BatchNorm (it cancels; build the conv with bias=False)"
    if bn_mode(bn) != mode:
        return f"{type(bn).__name__} in {'train' if bn.training else 'eval'} mode does not normalise with {mode} statistics"
    return None


def sync_group(bns: list[nn.Module], block_group=None):
    """The process group a block's train-mode BN statistics are synchronized over, or None.

    ``nn.SyncBatchNorm`` layers bring their own (None meaning the default group); a block's
    ``process_group`` synchronizes plain BatchNorm2d layers too. Nothing is synchronized unless
    torch.distributed is initialized with more than one process in that group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = block_group
    for bn in bns:
        if isinstance(bn, nn.SyncBatchNorm):
            group = bn.process_group or torch.distributed.group.WORLD
    if group is None or torch.distributed.get_world_size(group) < 2:
        return None
    return group


def resolve_momentum(bn: nn.BatchNorm2d) -> float:
    """The running-average factor of this step, exactly as nn.BatchNorm2d computes it
    (counting the step in ``num_batches_tracked``)."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


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
    residual_stride: int = 1,
) -> torch.Tensor:
    """``act(bn(conv(x)) [+ residual])`` as one fused launch with the BN folded into the conv;
    ``residual_stride`` reads an option-A residual (see ``conv_bn_act``)."""
    weight, shift = fold_conv_bn(conv, bn)
    return conv_bn_act(
        x, weight, None, shift, residual,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        relu=relu, backend=backend, residual_stride=residual_stride,
    )
