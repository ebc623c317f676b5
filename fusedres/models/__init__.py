"""The networks of He et al. 2015 on the fused blocks.

ImageNet (torchvision's ``ResNet``, same ``state_dict``): ``resnet18/34/50/101/152``,
``resnext50_32x4d``, ``resnext101_32x8d``, ``resnext101_64x4d``, ``wide_resnet50_2``,
``wide_resnet101_2`` and the plain ``plain18/34``. CIFAR-10: ``resnet20/32/44/56/110/1202`` and
the plain ``plain20/32/44/56/110``. Residual models take ``shortcut="A"|"B"|"C"`` (the paper's
options; CIFAR defaults to A, ImageNet to B) and every model takes ``backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fusedres.models.blocks import SHORTCUTS, make_shortcut
from fusedres.nn.blocks import PlainBlock, ShortcutA
from fusedres.models.cifar import (
    CifarResNet,
    plain20,
    plain32,
    plain44,
    plain56,
    plain110,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    resnet1202,
)
from fusedres.models.resnet import (
    plain18,
    plain34,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from fusedres.nn.convert import convert as from_torchvision
from fusedres.nn.convert import to_torchvision

IMAGENET_MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
              resnext101_64x4d, wide_resnet50_2, wide_resnet101_2, plain18, plain34)
}
CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202,
              plain20, plain32, plain44, plain56, plain110)
}


def build(name: str, **kwargs: Any) -> nn.Module:
    """The model called ``name`` (any of ``IMAGENET_MODELS`` or ``CIFAR_MODELS``)."""
    builders = {**IMAGENET_MODELS, **CIFAR_MODELS}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(builders)}")
    return builders[name](**kwargs)


__all__ = [
    "CIFAR_MODELS", "IMAGENET_MODELS", "SHORTCUTS", "CifarResNet", "PlainBlock", "ShortcutA", "build",
    "from_torchvision", "make_shortcut", "to_torchvision", *IMAGENET_MODELS, *CIFAR_MODELS,
]
