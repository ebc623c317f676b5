"""The ImageNet networks of He et al. 2015 (Table 1) and torchvision's ResNeXt and wide variants,
as torchvision's ``ResNet`` built on the fused blocks.

The models are torchvision ``ResNet``s as ``fusedres.convert`` leaves them
(``fusedres.nn.resnet.ResNet``: the fused eval stem; stages that hand each block's output to the
next), with the same ``state_dict`` as torchvision's (load its weights with ``load_state_dict``);
with the default shortcut option B and the same seed they are initialised exactly as
torchvision's. torchvision is imported on first use.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fusedres.models.blocks import check_shortcut, configure_blocks, make_shortcut
from fusedres.nn.blocks import PlainBlock
from fusedres.nn.blocks import BasicBlock, Bottleneck
from fusedres.nn.convert import convert


def _use_shortcut_option(model: nn.Module, option: str, norm_layer: Any) -> None:
    """Rebuild every block's ``downsample`` for shortcut option A or C (torchvision builds B)."""
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            last_conv = block.conv3 if isinstance(block, Bottleneck) else block.conv2
            block.downsample = make_shortcut(option, block.conv1.in_channels, last_conv.out_channels,
                                             block.stride, norm_layer)


def _resnet(block: type, layers: list[int], *, shortcut: str = "B", zero_init_residual: bool = False,
            backend: str | None = None, **kwargs: Any) -> nn.Module:
    from torchvision.models.resnet import ResNet

    check_shortcut(shortcut)
    model = ResNet(block, layers, **kwargs)
    if shortcut != "B":
        _use_shortcut_option(model, shortcut, kwargs.get("norm_layer") or nn.BatchNorm2d)
    configure_blocks(model, zero_init_residual, backend)
    return convert(model, backend)


def _plain(layers: list[int], *, backend: str | None = None, **kwargs: Any) -> nn.Module:
    from torchvision.models.resnet import ResNet

    model = ResNet(PlainBlock, layers, **kwargs)
    configure_blocks(model, backend=backend)
    return convert(model, backend)


# The builders take torchvision's ResNet keyword arguments (num_classes, groups, width_per_group,
# replace_stride_with_dilation, norm_layer, zero_init_residual) plus `shortcut` ("A", "B" or "C")
# and `backend`.

def resnet18(**kwargs: Any) -> nn.Module:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]): 11.7M parameters."""
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs: Any) -> nn.Module:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]): 21.8M parameters."""
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs: Any) -> nn.Module:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]; v1.5, stride on the 3x3): 25.6M parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs: Any) -> nn.Module:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]): 44.5M parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs: Any) -> nn.Module:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]): 60.2M parameters."""
    return _resnet(Bottleneck, [3, 8, 36, 3], **kwargs)


def resnext50_32x4d(**kwargs: Any) -> nn.Module:
    """ResNeXt-50 32x4d (Xie et al. 2017): ResNet-50 with 32 groups of width 4 in the 3x3 convs."""
    return _resnet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


def resnext101_32x8d(**kwargs: Any) -> nn.Module:
    """ResNeXt-101 32x8d."""
    return _resnet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8, **kwargs)


def resnext101_64x4d(**kwargs: Any) -> nn.Module:
    """ResNeXt-101 64x4d."""
    return _resnet(Bottleneck, [3, 4, 23, 3], groups=64, width_per_group=4, **kwargs)


def wide_resnet50_2(**kwargs: Any) -> nn.Module:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016): ResNet-50 with twice the bottleneck width."""
    return _resnet(Bottleneck, [3, 4, 6, 3], width_per_group=128, **kwargs)


def wide_resnet101_2(**kwargs: Any) -> nn.Module:
    """Wide ResNet-101-2."""
    return _resnet(Bottleneck, [3, 4, 23, 3], width_per_group=128, **kwargs)


def plain18(**kwargs: Any) -> nn.Module:
    """Plain-18: ResNet-18 without shortcuts (the paper's Fig. 4 baseline)."""
    return _plain([2, 2, 2, 2], **kwargs)


def plain34(**kwargs: Any) -> nn.Module:
    """Plain-34: ResNet-34 without shortcuts."""
    return _plain([3, 4, 6, 3], **kwargs)
