"""fusedres.models: architectures and parameter counts against the paper and torchvision, fused
outputs against the unfused reference, the shortcut options, the round trip to torchvision."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

import fusedres
from fusedres import models
from fusedres.analysis import unfused
from fusedres.models import PlainBlock, ShortcutA
from tests.conftest import assert_matches_reference, fused_backends, randomize_batchnorm

TORCHVISION_ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                     "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
# Blocks per stage n (6n + 2 layers) and the parameter counts of the paper's Table 6.
CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18, "resnet1202": 200}
PAPER_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6,
                "resnet110": 1.7e6, "resnet1202": 19.4e6}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cifar_hand_count(n: int, num_classes: int = 10) -> int:
    """Parameters of CIFAR ResNet-(6n+2) with option A shortcuts, counted from the paper's text."""
    def block(cin: int, cout: int) -> int:  # two 3x3 convs, two BNs (weight and bias)
        return 9 * cin * cout + 9 * cout * cout + 4 * cout

    stem = 9 * 3 * 16 + 2 * 16
    stages = n * block(16, 16) + block(16, 32) + (n - 1) * block(32, 32) + block(32, 64) + (n - 1) * block(64, 64)
    return stem + stages + 64 * num_classes + num_classes


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_imagenet_models_match_torchvision_architecture(arch):
    with torch.device("meta"):
        ours, theirs = models.build(arch), getattr(torchvision.models, arch)()
    assert isinstance(ours, tv_resnet.ResNet)
    assert n_params(ours) == n_params(theirs)
    shapes = [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == shapes
    assert not any(isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)) for m in ours.modules())


def test_resnet50_has_25557032_parameters():
    with torch.device("meta"):
        assert n_params(models.resnet50()) == 25_557_032


def test_same_seed_initialises_exactly_as_torchvision():
    torch.manual_seed(0)
    ours = models.resnet18(zero_init_residual=True).state_dict()
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(zero_init_residual=True).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not ours["layer1.0.bn2.weight"].any(), "zero_init_residual must reach the fused blocks"


@pytest.mark.parametrize("arch", CIFAR_DEPTHS)
def test_cifar_parameter_counts_match_the_paper(arch):
    n = CIFAR_DEPTHS[arch]
    with torch.device("meta"):
        model = models.build(arch)
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(layers) == 6 * n + 2
        assert n_params(model) == cifar_hand_count(n)
        assert abs(n_params(model) - PAPER_PARAMS[arch]) / PAPER_PARAMS[arch] < 0.02
        plain = arch.replace("resnet", "plain")
        if plain in models.CIFAR_MODELS:  # option A is parameter-free: the same count as the plain net
            assert n_params(models.build(plain)) == n_params(model)
        assert n_params(models.build(arch, num_classes=100)) == cifar_hand_count(n, num_classes=100)


def test_imagenet_plain_nets_are_resnets_without_shortcuts():
    with torch.device("meta"):
        for depth in (18, 34):
            plain, residual = models.build(f"plain{depth}"), models.build(f"resnet{depth}", shortcut="A")
            assert n_params(plain) == n_params(residual)
            assert not any(isinstance(m, fusedres.BasicBlock) for m in plain.modules())
            assert sum(isinstance(m, PlainBlock) for m in plain.modules()) == (depth - 2) // 2
        with pytest.raises(TypeError, match="shortcut"):
            models.plain18(shortcut="A")


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (fusedres.BasicBlock, fusedres.Bottleneck))]


@pytest.mark.parametrize("arch", ["resnet20", "resnet34", "resnet50"])
@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_shortcut_options(arch, shortcut):
    with torch.device("meta"):
        model = models.build(arch, shortcut=shortcut)
    for block in _blocks(model):
        last_conv = block.conv3 if isinstance(block, fusedres.Bottleneck) else block.conv2
        in_channels, out_channels = block.conv1.in_channels, last_conv.out_channels
        changes = block.stride != 1 or in_channels != out_channels
        if shortcut == "C" or (shortcut == "B" and changes):
            conv, bn = block.downsample
            assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (
                in_channels, out_channels, (1, 1), (block.stride, block.stride))
            assert bn.num_features == out_channels
        elif shortcut == "A" and changes:
            assert isinstance(block.downsample, ShortcutA)
            assert (block.downsample.in_channels, block.downsample.out_channels, block.downsample.stride) == (
                in_channels, out_channels, block.stride)
        else:
            assert block.downsample is None


def test_default_shortcuts_are_the_papers():
    with torch.device("meta"):
        assert any(isinstance(b.downsample, ShortcutA) for b in _blocks(models.resnet20()))
        assert any(isinstance(b.downsample, nn.Sequential) for b in _blocks(models.resnet18()))
    with pytest.raises(ValueError, match="shortcut must be one of"):
        models.resnet20(shortcut="D")


@pytest.mark.parametrize("in_channels,out_channels,stride,size", [
    (16, 32, 2, 8), (16, 32, 2, 7), (3, 8, 1, 5), (8, 8, 1, 6), (4, 12, 2, 9), (8, 8, 2, 5)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_shortcut_a_matches_explicit_reference(in_channels, out_channels, stride, size, memory_format):
    x = torch.randn(2, in_channels, size, size).contiguous(memory_format=memory_format)
    out_size = math.ceil(size / stride)
    expected = torch.zeros(2, out_channels, out_size, out_size)
    for i in range(out_size):
        for j in range(out_size):
            expected[:, :in_channels, i, j] = x[:, :, i * stride, j * stride]
    shortcut = ShortcutA(in_channels, out_channels, stride)
    assert torch.equal(shortcut(x), expected)
    assert not list(shortcut.parameters()) and not list(shortcut.buffers())


def test_shortcut_a_only_widens():
    with pytest.raises(ValueError, match="only widens"):
        ShortcutA(8, 4, 1)


# The C++ kernels when built, else the reference; pinned so that no test pays for auto's timing.
BACKEND = "native" if "native" in fused_backends("cpu") else "reference"

FAMILIES = {
    "cifar_resnet_A": lambda: models.resnet20(backend=BACKEND),
    "cifar_resnet_B": lambda: models.resnet20(shortcut="B", backend=BACKEND),
    "cifar_resnet_C": lambda: models.resnet20(shortcut="C", backend=BACKEND),
    "cifar_plain": lambda: models.plain20(backend=BACKEND),
    "resnet_basic_A": lambda: models.resnet18(num_classes=10, shortcut="A", backend=BACKEND),
    "resnext_bottleneck_B": lambda: models.resnext50_32x4d(num_classes=10, backend=BACKEND),
    "plain_imagenet": lambda: models.plain18(num_classes=10, backend=BACKEND),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_matches_unfused_reference(family):
    """Against the same model on torchvision's unfused math (float32: eager float64 grouped convs
    are too slow on a CPU for CI)."""
    model = FAMILIES[family]()
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = model(x)
        with unfused(model):
            expected = model(x)
    assert_matches_reference(got, expected.double(), torch.float32, what=f"{family} logits")


@pytest.mark.parametrize("family", ["cifar_resnet_A", "cifar_resnet_B", "cifar_plain", "resnet_basic_A"])
def test_train_matches_unfused_reference(family):
    """Outputs, running statistics and gradients after a train-mode step. The reference is the
    same float32 model on torchvision's math: against float64, batch statistics of a few images
    through 20 layers move float32 gradients by up to ~1% (ReLU masks flip), eager PyTorch's too."""
    model = FAMILIES[family]()
    randomize_batchnorm(model)
    model.train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    with unfused(reference):
        expected = reference(x)
    got = model(x)
    assert_matches_reference(got, expected.double(), torch.float32, what=f"{family} logits")
    for (name, a), b in zip(reference.named_buffers(), model.buffers()):
        assert torch.allclose(b.double(), a.double(), rtol=1e-5, atol=1e-6), name
    expected.square().mean().backward()
    got.square().mean().backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        grad = ref_grads[name].grad
        assert (p.grad - grad).norm() <= 1e-3 * grad.norm(), f"grad of {name}"


def test_to_torchvision_and_back_share_weights_and_outputs():
    model = models.resnet18(num_classes=10, shortcut="A")
    randomize_batchnorm(model)
    model.eval()
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused_out = model(x)
        tv = models.to_torchvision(model)
        assert tv is model
        assert not _blocks(tv) and sum(isinstance(m, tv_resnet.BasicBlock) for m in tv.modules()) == 8
        assert all(p is params[name] for name, p in tv.named_parameters())
        assert isinstance(tv.layer2[0].downsample, ShortcutA) and not tv.training
        tv_out = tv(x)
        assert_matches_reference(fused_out, tv_out.double(), torch.float32)
        back = models.from_torchvision(tv)
        assert len(_blocks(back)) == 8
        assert torch.equal(back(x), fused_out)


def test_to_torchvision_converts_a_single_block():
    block = fusedres.Bottleneck(16, 4)
    tv_block = models.to_torchvision(block)
    assert type(tv_block) is tv_resnet.Bottleneck and tv_block.conv2 is block.conv2 and tv_block.downsample is None


def test_backend_argument_reaches_every_block():
    model = models.resnet20(backend="reference")
    assert {b.backend for b in model.modules() if isinstance(b, (fusedres.BasicBlock, PlainBlock))} == {"reference"}
    assert {b.backend for b in models.plain20(backend="native").modules() if isinstance(b, PlainBlock)} == {"native"}
    with pytest.raises(ValueError, match="backend must be one of"):
        models.resnet20(backend="fast")


def test_zero_init_residual_zeroes_the_last_bn_of_each_branch():
    model = models.resnet20(zero_init_residual=True)
    assert all(not b.bn2.weight.any() and b.bn1.weight.all() for b in _blocks(model))
    model = models.resnet50(zero_init_residual=True)
    assert all(not b.bn3.weight.any() and b.bn2.weight.all() for b in _blocks(model))


def test_plain_block_falls_back_with_one_warning_when_unfusable():
    block = PlainBlock(4, 4)
    block.conv1.padding_mode = "reflect"
    randomize_batchnorm(block)
    block.eval()
    x = torch.randn(1, 4, 6, 6)
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        out = block(x)
    with torch.no_grad():
        expected = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
    assert torch.equal(out, expected)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        models.build("resnet19")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_option_a_shortcut_is_read_in_place(mode):
    """Option A costs no pass of its own: the block's last launch reads the strided input
    (conv_bn_act's epilogue in eval, bn_add_act in train), so ShortcutA.forward never runs."""
    model = models.resnet20(shortcut="A", backend=fused_backends("cpu")[0])
    randomize_batchnorm(model)
    model.train(mode == "train")
    reference = copy.deepcopy(model)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert shortcuts

    def called(module, args, output):
        raise AssertionError("ShortcutA.forward ran: option A was not fused")

    for m in shortcuts:
        m.register_forward_hook(called)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    with unfused(reference):
        expected = reference(x)
    assert_matches_reference(out, expected.double(), torch.float32)
