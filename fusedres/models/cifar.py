"""The CIFAR-10 networks of He et al. 2015, section 4.2: ResNet-20/32/44/56/110/1202 and their
plain counterparts.

A 3x3 conv stem with 16 channels, three stages of ``n`` blocks at 16, 32 and 64 channels on
32x32, 16x16 and 8x8 maps (the first block of stages 2 and 3 has stride 2), global average
pooling and a fully connected layer: 6n + 2 weighted layers. The residual nets use shortcut
option A by default, as in the paper, and so have exactly the parameters of the plain nets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fusedres.models.blocks import configure_blocks, init_like_torchvision, make_shortcut
from fusedres.nn.blocks import PlainBlock
from fusedres.nn.blocks import BasicBlock, conv3x3

STAGE_WIDTHS = (16, 32, 64)


class CifarResNet(nn.Module):
    """``block`` is ``fusedres.BasicBlock`` (residual) or :class:`PlainBlock` (plain).

    Attribute names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1``-``layer3``,
    ``fc``); the stem runs unfused, as torchvision's does.
    """

    def __init__(
        self,
        block: type[nn.Module],
        blocks_per_stage: int,
        num_classes: int = 10,
        shortcut: str = "A",
        zero_init_residual: bool = False,
        norm_layer: Callable[[int], nn.Module] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(3, STAGE_WIDTHS[0])
        self.bn1 = norm_layer(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_channels = STAGE_WIDTHS[0]
        for i, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                downsample = make_shortcut(shortcut, in_channels, width, stride, norm_layer)
                blocks.append(block(in_channels, width, stride, downsample, norm_layer=norm_layer))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        init_like_torchvision(self)
        configure_blocks(self, zero_init_residual, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(blocks_per_stage: int, **kwargs: Any) -> CifarResNet:
    return CifarResNet(BasicBlock, blocks_per_stage, **kwargs)


def _plain(blocks_per_stage: int, num_classes: int = 10, norm_layer: Callable[[int], nn.Module] | None = None,
           backend: str | None = None) -> CifarResNet:
    # PlainBlock drops the downsample it is given; option A's is parameter-free, so no weights are wasted.
    return CifarResNet(PlainBlock, blocks_per_stage, num_classes, "A", norm_layer=norm_layer, backend=backend)


# Keyword arguments: num_classes, shortcut ("A" default, "B", "C"; residual nets only),
# zero_init_residual (residual nets only), norm_layer, backend.

def resnet20(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (n=3): 0.27M parameters."""
    return _resnet(3, **kwargs)


def resnet32(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (n=5): 0.46M parameters."""
    return _resnet(5, **kwargs)


def resnet44(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (n=7): 0.66M parameters."""
    return _resnet(7, **kwargs)


def resnet56(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (n=9): 0.85M parameters."""
    return _resnet(9, **kwargs)


def resnet110(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (n=18): 1.7M parameters."""
    return _resnet(18, **kwargs)


def resnet1202(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-1202 (n=200): 19.4M parameters."""
    return _resnet(200, **kwargs)


def plain20(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-20: ResNet-20 without shortcuts."""
    return _plain(3, **kwargs)


def plain32(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-32."""
    return _plain(5, **kwargs)


def plain44(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-44."""
    return _plain(7, **kwargs)


def plain56(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-56."""
    return _plain(9, **kwargs)


def plain110(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-110."""
    return _plain(18, **kwargs)
