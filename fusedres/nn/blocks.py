"""Drop-in replacements for torchvision's ``Bottleneck`` and ``BasicBlock``.

Same constructor, attribute names and ``state_dict`` keys, so weights load both ways. When
every BatchNorm of a block normalises with running statistics (eval mode, or
``FrozenBatchNorm2d``), each conv runs as one fused launch with its BN folded in and the ReLU
and residual add in the epilogue: a Bottleneck is 3 launches (4 with a projection shortcut).
Otherwise (BatchNorm in train mode) the block runs torchvision's unfused math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fusedres import backends
from fusedres.nn.functional import conv_bn, unfusable_reason, warn_unfusable_once


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class _FusedBlock(nn.Module):
    """Shared machinery: the fusion decision, the shortcut, the backend."""

    # (conv, bn) attribute pairs of the residual branch, in order; the last one takes the add.
    _branch: tuple[tuple[str, str], ...] = ()
    downsample: nn.Module | None
    backend: str | None

    def _projection(self) -> tuple[nn.Module, nn.Module] | None:
        """The downsample as a (conv, bn) pair when it is torchvision's conv1x1 + BN."""
        ds = self.downsample
        if isinstance(ds, nn.Sequential) and len(ds) == 2:
            return ds[0], ds[1]
        return None

    def _unfusable_reason(self) -> str | None:
        pairs = [(getattr(self, c), getattr(self, b)) for c, b in self._branch]
        if self._projection() is not None:
            pairs.append(self._projection())
        for conv, bn in pairs:
            reason = unfusable_reason(conv, bn)
            if reason is not None:
                return reason
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reason = self._unfusable_reason()
        if reason is not None:
            if "train mode" not in reason:  # train mode is expected to run unfused for now
                warn_unfusable_once(self, reason)
            return self.forward_unfused(x)
        return self.forward_fused(x)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            return x
        projection = self._projection()
        if projection is None:
            return self.downsample(x)
        return conv_bn(x, *projection, relu=False, backend=self.backend)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv_name, bn_name in self._branch[:-1]:
            h = conv_bn(h, getattr(self, conv_name), getattr(self, bn_name), relu=True, backend=self.backend)
        conv_name, bn_name = self._branch[-1]
        return conv_bn(h, getattr(self, conv_name), getattr(self, bn_name), relu=True,
                       residual=self._shortcut(x), backend=self.backend)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's forward, op for op."""
        h = x
        for i, (conv_name, bn_name) in enumerate(self._branch):
            h = getattr(self, bn_name)(getattr(self, conv_name)(h))
            if i < len(self._branch) - 1:
                h = self.relu(h)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(h + identity)

    def extra_repr(self) -> str:
        return f"backend={self.backend or 'default'}"

    @classmethod
    def from_torchvision(cls, block: nn.Module, backend: str | None = None) -> "_FusedBlock":
        """A fused block sharing ``block``'s submodules (and so its parameters and buffers)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, module in block.named_children():
            setattr(fused, name, module)
        if "downsample" not in fused._modules:
            fused.downsample = None
        fused.stride = block.stride
        fused.backend = None if backend is None else backends.check_backend(backend)
        fused.train(block.training)
        return fused


class Bottleneck(_FusedBlock):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3x3) on fused kernels."""

    expansion: int = 4
    _branch = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.backend = None if backend is None else backends.check_backend(backend)


class BasicBlock(_FusedBlock):
    """torchvision's ``BasicBlock`` (two 3x3 convs) on fused kernels."""

    expansion: int = 1
    _branch = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.backend = None if backend is None else backends.check_backend(backend)
