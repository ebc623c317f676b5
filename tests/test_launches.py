"""How many kernels each converted block launches, per backend, in eval and in train (forward and
backward): the fused ops by name, and any other op whose output is larger than a per-channel
vector (a launch that touches activations outside the fused kernels)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from tests.conftest import fused_backends

CL = torch.channels_last
WIDEST = 32  # widest BN of the blocks below; (4, K) coefficient rows are per-channel too

# name -> (constructor, input channels)
BLOCKS = {
    "basic": (lambda: fusedres.BasicBlock(16, 16), 16),
    "basic_projection": (lambda: fusedres.BasicBlock(16, 32, 2, downsample=nn.Sequential(
        nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))), 16),
    "bottleneck": (lambda: fusedres.Bottleneck(32, 8), 32),
    "bottleneck_projection": (lambda: fusedres.Bottleneck(16, 8, 2, downsample=nn.Sequential(
        nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))), 16),
}

# Measured (native and Triton alike): per block, the fused launches of eval, train forward and
# train backward. Besides these, per train-mode BN: the forward's num_batches_tracked += 1 and
# bn_finalize (K values), and backward's bn_backward_coef (5 ops on K values); and one add of
# activations in backward, joining the input gradients of the shortcut and the branch.
EXPECTED = {
    "basic": dict(
        eval={"conv_bn_act": 2},
        forward={"conv_bn_stats": 2, "bn_finalize": 2, "bn_add_act": 1},
        backward={"conv_bn_backward": 2, "bn_act_backward": 1, "bn_backward_reduce": 1},
    ),
    "basic_projection": dict(
        eval={"conv_bn_act": 3},
        forward={"conv_bn_stats": 3, "bn_finalize": 3, "bn_add_act": 1},
        backward={"conv_bn_backward": 3, "bn_act_backward": 1, "bn_backward_reduce": 2},
    ),
    "bottleneck": dict(
        eval={"conv_bn_act": 3},
        forward={"conv_bn_stats": 3, "bn_finalize": 3, "bn_add_act": 1},
        backward={"conv_bn_backward": 3, "bn_act_backward": 1, "bn_backward_reduce": 1},
    ),
    "bottleneck_projection": dict(
        eval={"conv_bn_act": 4},
        forward={"conv_bn_stats": 4, "bn_finalize": 4, "bn_add_act": 1},
        backward={"conv_bn_backward": 4, "bn_act_backward": 1, "bn_backward_reduce": 2},
    ),
}


class _Log(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.fused: collections.Counter = collections.Counter()
        self.large: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        namespace, _, name = str(func.overloadpacket).partition(".")
        if namespace == "fusedres":
            self.fused[name.removesuffix("_triton")] += 1
        elif name != "detach":  # a view: what autograd saves, not a launch
            flat = out if isinstance(out, (tuple, list)) else [out]
            if max([t.numel() for t in flat if isinstance(t, torch.Tensor)] or [0]) > 4 * WIDEST:
                self.large[str(func.overloadpacket)] += 1
        return out


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_block_launches(backend, name):
    make, channels = BLOCKS[name]
    block = make()
    block.backend = backend
    x = torch.randn(2, channels, 9, 9).contiguous(memory_format=CL)
    expected = EXPECTED[name]

    block.eval()
    with torch.no_grad():
        block(x)  # the first call may build a launch plan
        with _Log() as log:
            block(x)
    assert dict(log.fused) == expected["eval"] and not log.large, (dict(log.fused), dict(log.large))

    block.train()
    x = x.requires_grad_()
    with _Log() as log:
        out = block(x)
    assert dict(log.fused) == expected["forward"] and not log.large, (dict(log.fused), dict(log.large))
    grad = torch.randn_like(out)
    with _Log() as log:
        out.backward(grad)
    assert dict(log.fused) == expected["backward"], dict(log.fused)
    assert dict(log.large) == {"aten.add": 1}, dict(log.large)
