"""Swap torchvision's residual blocks in a model for fusedres's, in place, keeping the weights."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

from fusedres.nn.blocks import BasicBlock, Bottleneck, _FusedBlock


def _hooked(module: nn.Module) -> bool:
    """True when hooks may see (and keep) what ``module`` takes or returns, or its gradients."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


class Stage(nn.Sequential):
    """``nn.Sequential`` of residual blocks (a ResNet's ``layerN``), as ``convert`` leaves it:
    same children, ``state_dict`` keys and result. A block's output that only the next block
    reads is handed over as owned, so an identity shortcut's add is done in place into it
    (oneDNN's sum post-op; an out-of-place add costs up to 2x the conv in ResNet-50's layer1).
    Nothing is handed over past a block that hooks can see."""

    def forward(self, x):
        owned = False
        for block in self:
            if owned and not _hooked(block):
                x = block.forward_owned(x)
            else:
                x = block(x)
            owned = isinstance(block, _FusedBlock) and not _hooked(block)
        return x


def _stage_of(module: nn.Module) -> nn.Module:
    """A plain ``nn.Sequential`` whose children are all fused blocks, as a ``Stage``."""
    if type(module) is not nn.Sequential or len(module) < 2:
        return module
    if not all(isinstance(m, _FusedBlock) for m in module):
        return module
    stage = Stage()
    for name, child in module.named_children():
        stage.add_module(name, child)
    stage.train(module.training)
    return stage


def _torchvision_block_types() -> dict[type, type]:
    try:
        from torchvision.models import resnet
    except ImportError:
        return {}
    return {resnet.Bottleneck: Bottleneck, resnet.BasicBlock: BasicBlock}


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Replace every torchvision ``Bottleneck``/``BasicBlock`` inside ``model`` by the fused block.

    The new blocks share the old blocks' submodules, so parameters, buffers, ``state_dict``
    keys, the train/eval mode and any ``FrozenBatchNorm2d`` carry over. Returns ``model``
    (also changed in place); a model that is itself a block is returned converted. A torchvision
    ``ResNet`` itself becomes ``fusedres.nn.resnet.ResNet`` (same object and state; its eval stem
    is one launch). ``backend`` pins the converted blocks and stem to one backend (None: the
    global default).
    """
    swaps = _torchvision_block_types()
    if type(model) in swaps:
        return swaps[type(model)].from_torchvision(model, backend)
    for name, child in model.named_children():
        new = _stage_of(convert(child, backend))
        if new is not child:
            setattr(model, name, new)
    if swaps and type(model) is _torchvision_resnet():
        from fusedres.nn.resnet import ResNet

        return ResNet.from_torchvision(model, backend)
    return model


def _torchvision_resnet() -> type | None:
    from torchvision.models import resnet

    return resnet.ResNet


def to_torchvision(model: nn.Module) -> nn.Module:
    """The reverse of :func:`convert`: every fused ``Bottleneck``/``BasicBlock`` inside ``model``
    becomes torchvision's, in place, sharing the fused block's submodules (so parameters, buffers,
    ``state_dict`` keys and the train/eval mode carry over). Returns ``model``; a model that is
    itself a fused block is returned converted. Needs torchvision.
    """
    from torchvision.models import resnet

    swaps = {Bottleneck: resnet.Bottleneck, BasicBlock: resnet.BasicBlock}
    if type(model) in swaps:
        block = swaps[type(model)].__new__(swaps[type(model)])
        nn.Module.__init__(block)
        for name, module in model.named_children():
            setattr(block, name, module)
        if "downsample" not in block._modules:
            block.downsample = None
        block.stride = model.stride
        block.train(model.training)
        return block
    from fusedres.nn.resnet import ResNet

    if isinstance(model, ResNet):
        model.to_torchvision()
    if isinstance(model, Stage):
        plain = nn.Sequential()
        for name, child in model.named_children():
            plain.add_module(name, to_torchvision(child))
        return plain.train(model.training)
    for name, child in model.named_children():
        new = to_torchvision(child)
        if new is not child:
            setattr(model, name, new)
    return model
