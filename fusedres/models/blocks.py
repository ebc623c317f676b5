"""Shortcut options and initialisation for the paper's models (the blocks live in fusedres.nn)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fusedres import backends
from fusedres.nn.blocks import BasicBlock, Bottleneck, PlainBlock, ShortcutA, conv1x1

SHORTCUTS = ("A", "B", "C")


def check_shortcut(option: str) -> str:
    if option not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {option!r}")
    return option


def init_like_torchvision(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He-normal convs (fan-out), BatchNorm to the identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def configure_blocks(model: nn.Module, zero_init_residual: bool = False, backend: str | None = None) -> None:
    """The builders' block options, applied after construction.

    torchvision's ``zero_init_residual`` only recognises its own block classes, so it is done
    here: the last BatchNorm of each residual branch starts at zero (each block starts as its
    shortcut). ``backend`` pins every fused block to one backend.
    """
    if backend is not None:
        backends.check_backend(backend)
    for m in model.modules():
        if backend is not None and isinstance(m, (BasicBlock, Bottleneck, PlainBlock)):
            m.backend = backend
        if zero_init_residual and isinstance(m, (BasicBlock, Bottleneck)):
            last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2
            if last_bn.weight is not None:
                nn.init.zeros_(last_bn.weight)


def make_shortcut(
    option: str,
    in_channels: int,
    out_channels: int,
    stride: int,
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
) -> nn.Module | None:
    """The ``downsample`` of a block mapping ``in_channels`` to ``out_channels`` at ``stride``.

    A: identity, or :class:`ShortcutA` where the dimensions change. B: identity, or a projection
    (1x1 conv + BN, torchvision's) where they change. C: a projection on every block.
    """
    changes = stride != 1 or in_channels != out_channels
    if check_shortcut(option) == "C" or (option == "B" and changes):
        projection = nn.Sequential(conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))
        init_like_torchvision(projection)
        return projection
    if option == "A" and changes:
        return ShortcutA(in_channels, out_channels, stride)
    return None
