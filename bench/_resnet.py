"""The shapes the suites run, read off torchvision's ResNets rather than typed in by hand.

Every conv (and block) is found by running the model once on the meta device with forward
hooks, at batch 1; the suites then scale the batch.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

BLOCK_TYPES = (tv_resnet.Bottleneck, tv_resnet.BasicBlock)


@dataclass(frozen=True)
class ConvShape:
    """One distinct conv of a network, with the epilogue its place in a block gives it."""

    name: str  # first module of the network with this shape, e.g. "layer2.0.conv2"
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    residual: bool  # the last conv of a block takes the shortcut add
    relu: bool  # a projection shortcut's conv has no ReLU
    count: int  # how many convs of the network have this shape

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in (self.height, self.width))

    @property
    def label(self) -> str:
        p, q = self.out_hw
        epilogue = "+res+relu" if self.residual else ("+relu" if self.relu else "")
        repeat = f" x{self.count}" if self.count > 1 else ""
        return (f"{self.name} {self.in_channels}x{self.height}x{self.width}->{self.out_channels}x{p}x{q} "
                f"{self.kernel}x{self.kernel}/{self.stride}{epilogue}{repeat}")

    def flops(self, batch: int) -> float:
        p, q = self.out_hw
        return 2.0 * batch * p * q * self.out_channels * self.in_channels * self.kernel**2 / self.groups


@dataclass(frozen=True)
class BlockShape:
    """A residual block of a torchvision ResNet and the input it sees there."""

    arch: str  # "resnet50" or "resnet18"
    name: str  # e.g. "layer2.0"
    kind: str  # "Bottleneck" or "BasicBlock"
    in_channels: int
    height: int
    width: int
    stride: int
    projection: bool

    @property
    def label(self) -> str:
        shortcut = "projection" if self.projection else "identity"
        return (f"{self.kind} {self.arch}.{self.name} {self.in_channels}x{self.height}x{self.width} "
                f"s{self.stride} {shortcut}")


@functools.cache
def _meta_model(arch: str) -> nn.Module:
    with torch.device("meta"):
        return getattr(torchvision.models, arch)()


def _input_shapes(model: nn.Module, types: tuple[type, ...], image_size: int) -> dict[str, tuple[int, ...]]:
    """Input shape of every submodule of ``types``, by name, in the order the forward reaches them."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, args: tuple) -> None:
        shapes.setdefault(name, tuple(args[0].shape))

    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: record(name, args))
        for name, module in model.named_modules()
        if isinstance(module, types)
    ]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _conv_roles(model: nn.Module) -> dict[str, tuple[bool, bool]]:
    """(residual, relu) of each conv inside a block; convs outside blocks (the stem) get BN+ReLU."""
    roles = {}
    for block_name, block in model.named_modules():
        if isinstance(block, BLOCK_TYPES):
            convs = [name for name, child in block.named_children() if isinstance(child, nn.Conv2d)]
            for name in convs:
                roles[f"{block_name}.{name}"] = (name == convs[-1], True)
            if block.downsample is not None:
                roles[f"{block_name}.downsample.0"] = (False, False)
    return roles


@functools.cache
def conv_shapes(arch: str, image_size: int) -> tuple[ConvShape, ...]:
    """The distinct convs of ``arch`` on ``image_size`` x ``image_size`` images, in network order."""
    model = _meta_model(arch)
    modules = dict(model.named_modules())
    roles = _conv_roles(model)
    found: dict[tuple, ConvShape] = {}
    for name, (_, c, h, w) in _input_shapes(model, (nn.Conv2d,), image_size).items():
        conv = modules[name]
        residual, relu = roles.get(name, (False, True))
        key = (c, h, w, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.groups,
               residual, relu)
        first = found.get(key)
        found[key] = ConvShape(
            name=first.name if first else name, in_channels=c, height=h, width=w,
            out_channels=conv.out_channels, kernel=conv.kernel_size[0], stride=conv.stride[0],
            padding=conv.padding[0], groups=conv.groups, residual=residual, relu=relu,
            count=first.count + 1 if first else 1,
        )
    return tuple(found.values())


@functools.cache
def block_shapes(arch: str, image_size: int) -> tuple[BlockShape, ...]:
    """The first two blocks of each stage of ``arch`` (the first may project, the second is an
    identity block), without repeats."""
    model = _meta_model(arch)
    modules = dict(model.named_modules())
    shapes = []
    for name, (_, c, h, w) in _input_shapes(model, BLOCK_TYPES, image_size).items():
        if int(name.split(".")[1]) > 1:
            continue
        block = modules[name]
        shape = BlockShape(arch, name, type(block).__name__, c, h, w, block.stride, block.downsample is not None)
        if all((s.kind, s.in_channels, s.height, s.stride, s.projection)
               != (shape.kind, c, h, shape.stride, shape.projection) for s in shapes):
            shapes.append(shape)
    return tuple(shapes)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so BN folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for tensor, low, high in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                                          (m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


@functools.cache
def _seeded_model(arch: str, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)()
    randomize_batchnorm(model, generator)
    return model


def build_model(arch: str, seed: int = 0) -> nn.Module:
    """A torchvision ``arch`` with seeded random weights and random BatchNorm statistics, on the
    CPU (a fresh copy each call)."""
    return copy.deepcopy(_seeded_model(arch, seed))


def build_block(shape: BlockShape, seed: int = 0) -> nn.Module:
    """A copy of the torchvision block ``shape`` names, with its network's random weights."""
    return copy.deepcopy(_seeded_model(shape.arch, seed).get_submodule(shape.name))


@dataclass(frozen=True)
class MetaForward:
    flops: float  # multiply-adds of the convs and linear layers, 2 FLOPs each
    output_shape: tuple[int, ...]


def meta_forward(module: nn.Module, input_shape: tuple[int, ...]) -> MetaForward:
    """FLOPs and output shape of one forward of ``module``, run on a meta copy (no compute)."""
    flops = 0.0

    def conv_hook(m, args, out):
        nonlocal flops
        flops += 2.0 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, args, out):
        nonlocal flops
        flops += 2.0 * out.numel() * m.in_features

    meta = copy.deepcopy(module).to("meta")
    for m in meta.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        out = meta(torch.empty(input_shape, device="meta"))
    return MetaForward(flops, tuple(out.shape))
