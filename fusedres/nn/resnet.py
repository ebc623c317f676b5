"""What ``convert`` makes of a torchvision ``ResNet``: the same object, modules, ``state_dict``
keys and result, with a stem that is one launch in eval.

``convert`` swaps the model's class for :class:`ResNet` (a subclass of torchvision's, adding
nothing to the state); ``to_torchvision`` swaps it back. On the CPU with backend ``auto``, an
eval forward that records no autograd runs ``relu(bn1(conv1(x)))`` as one prepacked oneDNN call
(``fusedres.nn.plan.StemPlan``) whose output is channels_last, so an NCHW input is converted once,
at its 3 channels. Everything else (train mode, autograd, ``torch.compile``, autocast, hooks on
the stem, another device, dtype or backend, a stem the fold does not take) runs torchvision's
stem unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as _torchvision

from fusedres import backends
from fusedres.nn.convert import _hooked
from fusedres.nn.functional import unfusable_reason
from fusedres.nn.plan import StemPlan, onednn_reason


class ResNet(_torchvision.ResNet):
    """A torchvision ``ResNet`` whose blocks ``convert`` swapped, with the fused eval stem."""

    backend: str | None = None  # None: the global default (as the converted blocks)
    _stem_plan: StemPlan | None = None

    @classmethod
    def from_torchvision(cls, model: _torchvision.ResNet, backend: str | None = None) -> "ResNet":
        model.__class__ = cls
        model.backend = backend
        return model

    def to_torchvision(self) -> _torchvision.ResNet:
        self.__dict__.pop("backend", None)
        self.__dict__.pop("_stem_plan", None)
        self.__class__ = _torchvision.ResNet
        return self

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn1(conv1(x)))``: the plan's one launch when it serves, else torchvision's."""
        if torch.compiler.is_compiling() or _hooked(self.conv1) or _hooked(self.bn1) or _hooked(self.relu):
            return self.relu(self.bn1(self.conv1(x)))
        plan = self._stem_plan
        if plan is not None:
            out = plan(x)  # None when stale
            if out is not None:
                return out
            self._stem_plan = None
        if self._stem_fusable(x):
            plan = StemPlan(self, self.conv1, self.bn1, x)
            out = plan(x)
            if out is not None:
                self._stem_plan = plan
                return out
        return self.relu(self.bn1(self.conv1(x)))

    def _stem_fusable(self, x: torch.Tensor) -> bool:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or type(self.relu) is not nn.ReLU:
            return False
        if unfusable_reason(self.conv1, self.bn1, "running") is not None:
            return False
        requested = self.backend or backends.get_default_backend()
        return onednn_reason(x.device, x.dtype, requested) is None and not torch.is_autocast_enabled(x.device.type)

    def __getstate__(self) -> dict:
        # Copies and pickles make their own plan: the packed weight is a cache, not state.
        state = dict(super().__getstate__())
        state.pop("_stem_plan", None)
        return state
