"""Swap torchvision's residual blocks in a model for fusedres's, in place, keeping the weights."""

from __future__ import annotations

from torch import nn

from fusedres.nn.blocks import BasicBlock, Bottleneck


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
    (also changed in place); a model that is itself a block is returned converted.
    ``backend`` pins the converted blocks to one backend (None: the global default).
    """
    swaps = _torchvision_block_types()
    if type(model) in swaps:
        return swaps[type(model)].from_torchvision(model, backend)
    for name, child in model.named_children():
        new = convert(child, backend)
        if new is not child:
            setattr(model, name, new)
    return model


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
    for name, child in model.named_children():
        new = to_torchvision(child)
        if new is not child:
            setattr(model, name, new)
    return model
