"""Drop-in blocks, convert(), BN folding and whole torchvision models against the unfused originals."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

import fusedres
from fusedres.ops import bn_fold
from tests.conftest import assert_fused_ran, assert_matches_reference, fused_backends, fused_ops, randomize_batchnorm

CL = torch.channels_last
BACKENDS = fused_backends("cpu")


def _pair(model_fn, **kwargs):
    """A torchvision model with random BN state, and its fusedres conversion (a deep copy)."""
    model = model_fn(**kwargs)
    randomize_batchnorm(model)
    return model, fusedres.convert(copy.deepcopy(model))


def test_convert_swaps_every_block_and_keeps_state_dict():
    model, fused = _pair(torchvision.models.resnet50)
    kinds = {type(m) for m in fused.modules()}
    assert fusedres.Bottleneck in kinds and resnet.Bottleneck not in kinds
    assert sum(isinstance(m, fusedres.Bottleneck) for m in fused.modules()) == 16
    ref_state, fused_state = model.state_dict(), fused.state_dict()
    assert list(ref_state) == list(fused_state)
    assert all(torch.equal(ref_state[k], fused_state[k]) for k in ref_state)


@pytest.mark.parametrize("block_cls,tv_cls", [(fusedres.Bottleneck, resnet.Bottleneck), (fusedres.BasicBlock, resnet.BasicBlock)])
def test_blocks_load_torchvision_weights_both_ways(block_cls, tv_cls):
    downsample = torch.nn.Sequential(torch.nn.Conv2d(16, 8 * tv_cls.expansion, 1, 2, bias=False),
                                     torch.nn.BatchNorm2d(8 * tv_cls.expansion))
    tv = tv_cls(16, 8, stride=2, downsample=downsample)
    randomize_batchnorm(tv)
    ours = block_cls(16, 8, stride=2, downsample=copy.deepcopy(downsample))
    ours.load_state_dict(tv.state_dict())
    back = tv_cls(16, 8, stride=2, downsample=copy.deepcopy(downsample))
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 9, 9)
    tv.eval(), ours.eval(), back.eval()
    with torch.no_grad():
        assert_matches_reference(ours(x), tv(x.double().float()).double(), torch.float32)
        assert torch.equal(back(x), tv(x))
    assert block_cls.expansion == tv_cls.expansion


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("block", ["bottleneck_projection", "bottleneck_identity", "bottleneck_grouped", "basic_projection", "basic_identity"])
def test_block_eval_matches_torchvision(block, backend, poison_outputs):
    inplanes, planes, stride, groups, base_width = {
        "bottleneck_projection": (16, 8, 2, 1, 64),
        "bottleneck_identity": (32, 8, 1, 1, 64),
        "bottleneck_grouped": (32, 8, 1, 4, 16),
        "basic_projection": (8, 16, 2, 1, 64),
        "basic_identity": (16, 16, 1, 1, 64),
    }[block]
    cls = resnet.Bottleneck if block.startswith("bottleneck") else resnet.BasicBlock
    downsample = None
    if stride != 1 or inplanes != planes * cls.expansion:
        downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes * cls.expansion, 1, stride, bias=False),
                                         torch.nn.BatchNorm2d(planes * cls.expansion))
    tv = cls(inplanes, planes, stride, downsample, groups=groups, base_width=base_width)
    randomize_batchnorm(tv)
    tv.eval()
    fused = fusedres.convert(copy.deepcopy(tv), backend=backend)
    x = torch.randn(2, inplanes, 13, 13).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = copy.deepcopy(tv).double()(x.double())
        with fused_ops() as log:
            got = fused(x)
    if backend != "reference":
        assert_fused_ran(log, backend)
    assert_matches_reference(got, expected, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torchvision_model_eval_logits(arch, dtype):
    model, fused = _pair(getattr(torchvision.models, arch))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval().double()(x.double())
        baseline = model.eval().to(dtype)(x.to(dtype))
        got = fused.eval().to(dtype)(x.to(dtype))
    assert_matches_reference(got, expected, dtype, baseline, what=f"{arch} logits")


def test_fold_cache_never_stale():
    conv, bn = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6)
    block_like = torch.nn.ModuleDict({"conv": conv, "bn": bn})
    randomize_batchnorm(block_like)
    bn.eval()
    x = torch.randn(1, 4, 5, 5)

    def fused():
        with torch.no_grad():
            return fusedres.nn.functional.conv_bn(x, conv, bn, relu=False, backend="reference")

    def truth():
        with torch.no_grad():
            return bn(conv(x))

    assert_matches_reference(fused(), truth().double(), torch.float32)
    with torch.no_grad():
        assert bn_fold.fold_conv_bn(conv, bn)[0] is bn_fold.fold_conv_bn(conv, bn)[0], "cache not used"
    with torch.no_grad():
        bn.running_var.mul_(3.0)  # in-place update, as BN training does
    assert_matches_reference(fused(), truth().double(), torch.float32)
    state = copy.deepcopy(block_like.state_dict())
    state["conv.weight"].normal_()
    block_like.load_state_dict(state)
    assert_matches_reference(fused(), truth().double(), torch.float32)
    torch.optim.SGD(conv.parameters(), lr=0.5).zero_grad()
    conv.weight.grad = torch.randn_like(conv.weight)
    torch.optim.SGD(conv.parameters(), lr=0.5).step()
    assert_matches_reference(fused(), truth().double(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_eval_bn_gradients_reach_conv_and_bn_params(backend):
    """Frozen-statistics fine-tuning: BN in eval, its affine parameters and the convs still train."""
    model, fused = _pair(torchvision.models.resnet18)
    fused = fusedres.convert(fused, backend=backend)
    model.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    fused(x).square().mean().backward()
    ref_grads = dict(model.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        assert_matches_reference(p.grad, ref_grads[name].grad.double(), torch.float32, what=f"grad of {name}")


def test_frozen_batchnorm_model_trains_fused():
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    randomize_batchnorm(model)
    fused = fusedres.convert(copy.deepcopy(model))
    assert all(fusedres.nn.functional.bn_uses_running_stats(m) for m in fused.modules() if isinstance(m, FrozenBatchNorm2d))
    model.train(), fused.train()
    x = torch.randn(2, 3, 32, 32)
    out_ref, out = model(x), fused(x)
    assert_matches_reference(out, out_ref.double(), torch.float32)
    out_ref.sum().backward()
    out.sum().backward()
    grad_ref = model.layer1[0].conv1.weight.grad
    assert_matches_reference(fused.layer1[0].conv1.weight.grad, grad_ref.double(), torch.float32)


def test_train_mode_runs_unfused_reference_math():
    model, fused = _pair(torchvision.models.resnet18)
    x = torch.randn(4, 3, 32, 32)
    model.train(), fused.train()
    assert_matches_reference(fused(x), model(x).double(), torch.float32)
    for (name, a), b in zip(model.named_buffers(), fused.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), name


def test_backend_argument_is_validated():
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedres.Bottleneck(8, 2, backend="cutlass")
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedres.set_default_backend("fast")


def test_unfusable_conv_falls_back_with_one_warning():
    tv = resnet.BasicBlock(4, 4)
    tv.conv1.padding_mode = "reflect"
    tv.eval()
    fused = fusedres.convert(copy.deepcopy(tv))
    x = torch.randn(1, 4, 6, 6)
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        out = fused(x)
    assert torch.equal(out, tv(x))
