"""The CPU eval path on oneDNN: packed convs against the reference, and converted blocks and
models (which kernels ran, numerics against float64, the caller's input never written)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet

import fusedres
from fusedres import backends
from fusedres.nn import plan as plan_mod
from fusedres.nn.convert import Stage, to_torchvision
from fusedres.ops import _ref, onednn, winograd
from tests.conftest import assert_matches_reference, randomize_batchnorm, relative_error

CL = torch.channels_last
pytestmark = pytest.mark.skipif(onednn.unusable_reason(torch.device("cpu"), torch.float32) is not None,
                                reason="this torch has no oneDNN")
# bf16 only where the CPU runs oneDNN bf16 convs natively (AVX512-BF16 / AMX).
DTYPES = [torch.float32] + ([torch.bfloat16] if onednn.bf16_supported() else [])


def _x(*shape, dtype=torch.float32, channels_last=True):
    x = torch.randn(*shape).to(dtype)
    return x.contiguous(memory_format=CL) if channels_last else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", [
    # (N, C, H, W, K, R, stride, padding, dilation, groups)
    (1, 8, 7, 7, 16, 3, 1, 1, 1, 1),
    (2, 6, 13, 11, 10, 3, 2, 1, 1, 1),
    (3, 16, 9, 9, 8, 1, 1, 0, 1, 1),
    (2, 16, 8, 8, 32, 1, 2, 0, 1, 1),
    (2, 12, 9, 9, 12, 3, 1, 2, 2, 1),
    (2, 12, 9, 9, 12, 3, 1, 1, 1, 4),
    (1, 5, 17, 13, 7, 3, 2, 1, 1, 1),
], ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("epilogue", ["none", "relu", "add_relu", "add_relu_inplace"])
def test_packed_conv_matches_reference(geometry, epilogue, dtype, poison_outputs):
    n, c, h, w, k, r, stride, padding, dilation, groups = geometry
    x = _x(n, c, h, w, dtype=dtype)
    weight = torch.randn(k, c // groups, r, r)
    scale, shift = torch.rand(k) + 0.5, torch.randn(k)
    packed = onednn.PackedConv(weight * scale.view(-1, 1, 1, 1), shift, (stride,) * 2, (padding,) * 2,
                               (dilation,) * 2, groups, x.shape, dtype)
    conv_args = ((stride,) * 2, (padding,) * 2, (dilation,) * 2, groups)
    p, q = _ref.conv_bn_act(x.double(), weight.double(), None, None, None, *conv_args, False).shape[2:]
    residual = _x(n, k, p, q, dtype=dtype) if epilogue.startswith("add") else None
    expected = _ref.conv_bn_act(x.double(), weight.double(), scale.double(), shift.double(),
                                None if residual is None else residual.double(), *conv_args, epilogue != "none")
    baseline = _ref.conv_bn_act(x, weight.to(dtype), scale, shift, residual, *conv_args, epilogue != "none")
    if epilogue == "add_relu_inplace":
        target = residual.clone()
        got = packed.add_relu(x, target, inplace=True)
        assert got.data_ptr() == target.data_ptr(), "the in-place add did not write into the residual"
    elif epilogue == "add_relu":
        kept = residual.clone()
        got = packed.add_relu(x, residual, inplace=False)
        assert torch.equal(residual, kept), "the out-of-place add wrote into the residual"
    else:
        got = packed(x, relu=epilogue == "relu")
    assert got.dtype == dtype and got.is_contiguous(memory_format=CL)
    assert_matches_reference(got, expected, dtype, baseline)


def test_packed_weight_is_reused_across_batch_sizes():
    """Packed for batch 8, correct at batch 1 and 3 (one pack per plan, whatever the batch)."""
    weight, shift = torch.randn(16, 8, 3, 3), torch.randn(16)
    packed = onednn.PackedConv(weight, shift, (1, 1), (1, 1), (1, 1), 1, (8, 8, 10, 10), torch.float32)
    for n in (1, 3):
        x = _x(n, 8, 10, 10)
        expected = torch.relu(torch.conv2d(x.double(), weight.double(), shift.double(), padding=1))
        assert_matches_reference(packed(x, True), expected, torch.float32)


def test_unusable_reasons_name_the_case():
    cpu = torch.device("cpu")
    assert "float64" in onednn.unusable_reason(cpu, torch.float64)
    assert "CPU" in onednn.unusable_reason(torch.device("cuda"), torch.float32)
    assert plan_mod.onednn_reason(cpu, torch.float32, "native") == "backend 'native' was requested"
    assert "oneDNN" in backends.kernels_of(plan_mod.ONEDNN, cpu)


# --- blocks ---------------------------------------------------------------------------------

def _block(kind: str) -> nn.Module:
    """A torchvision block (or fusedres-only block) of each shortcut kind, random BN, eval."""
    projection = lambda cin, cout, s: nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False),  # noqa: E731
                                                    nn.BatchNorm2d(cout))
    if kind == "bottleneck_identity":
        block = resnet.Bottleneck(32, 8)
    elif kind == "bottleneck_projection":
        block = resnet.Bottleneck(16, 8, 2, projection(16, 32, 2))
    elif kind == "bottleneck_grouped_dilated":
        block = resnet.Bottleneck(32, 8, 1, None, groups=4, base_width=16, dilation=2)
    elif kind == "basic_identity":
        block = resnet.BasicBlock(16, 16)
    elif kind == "basic_projection":
        block = resnet.BasicBlock(8, 16, 2, projection(8, 16, 2))
    elif kind == "basic_option_a":
        block = fusedres.BasicBlock(8, 16, 2, fusedres.nn.blocks.ShortcutA(8, 16, 2))
    elif kind == "basic_module_shortcut":  # ResNet-D style: average pool, then the projection
        block = fusedres.BasicBlock(8, 16, 2, nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(8, 16, 1),
                                                            nn.BatchNorm2d(16)))
    elif kind == "plain":
        block = fusedres.nn.blocks.PlainBlock(8, 16, 2)
    else:
        raise ValueError(kind)
    randomize_batchnorm(block)
    return block.eval()


BLOCKS = ["bottleneck_identity", "bottleneck_projection", "bottleneck_grouped_dilated", "basic_identity",
          "basic_projection", "basic_option_a", "basic_module_shortcut", "plain"]


def _eager(block: nn.Module):
    """The block's unfused eager forward (torchvision's, or a fusedres block's forward_unfused)."""
    return block.forward_unfused if isinstance(block, fusedres.nn.blocks._FusedBlock) else block


def _fused(block: nn.Module, backend: str | None = None) -> nn.Module:
    fused = copy.deepcopy(block)
    return fusedres.convert(fused, backend=backend) if not isinstance(fused, fusedres.nn.blocks._FusedBlock) else fused


def _expected_kernels(fused, dtype: torch.dtype, mode: str) -> tuple[str, ...]:
    """The kernel of each conv (branch, then projection) with ``plan.WINOGRAD == mode`` ("on"/"off")."""
    def kernel(conv):
        reason = winograd.unusable_reason(conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                                          dtype, torch.device("cpu"))
        return plan_mod.WINOGRAD_KERNEL if mode == "on" and reason is None else plan_mod.ONEDNN
    return tuple(kernel(conv) for conv, _ in fused._pairs())


@pytest.mark.parametrize("winograd_mode", ["off", "on"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", BLOCKS)
def test_block_eval_runs_on_onednn(kind, dtype, channels_last, winograd_mode, poison_outputs, monkeypatch):
    """Every conv runs on oneDNN, or (plan.WINOGRAD "on") on Winograd where it takes the conv."""
    monkeypatch.setattr(plan_mod, "WINOGRAD", winograd_mode)
    block = _block(kind)
    fused = _fused(block)
    fused.backend = "auto"
    cin = fused._pairs()[0][0].in_channels
    x = _x(2, cin, 13, 13, dtype=dtype, channels_last=channels_last)
    x_before = x.clone()
    with torch.no_grad():
        expected = _eager(copy.deepcopy(block).double())(x.double())
        baseline = _eager(copy.deepcopy(block).to(dtype))(x)
        fused.to(dtype)
        first = fused(x)
        second = fused(x)  # the steady state: the plan made by the first call
    assert fused._eval_plan is not None
    assert fused._eval_plan.kernels == _expected_kernels(fused, dtype, winograd_mode)
    assert torch.equal(x, x_before), "the block wrote into its caller's input"
    assert torch.equal(first, second)
    assert_matches_reference(second, expected, dtype, baseline)


def test_named_native_backend_keeps_the_cpp_kernels():
    """The C++ CPU kernels (the CUDA kernels' twins in the tests) still run where named."""
    block = _block("bottleneck_projection")
    fused = _fused(block, backend="native")
    x = _x(2, 16, 9, 9)
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(x.double())
        got = fused(x)
    assert fused._eval_plan.kernels == ("native",) * 4
    assert_matches_reference(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_block_oneDNN_cannot_take_runs_the_existing_path_with_a_reason(dtype, monkeypatch):
    monkeypatch.setattr(plan_mod, "_warned", set())
    block = _block("bottleneck_projection").to(dtype)
    fused = _fused(block)
    fused.backend = "auto"
    x = _x(2, 16, 9, 9, dtype=dtype)
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(x.double())
        with pytest.warns(UserWarning, match=f"not on oneDNN: .*{dtype}"):
            got = fused(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fused(x)  # the reason is given once
    assert plan_mod.ONEDNN not in fused._eval_plan.kernels
    if dtype == torch.float64:  # folded in float64: float64 accuracy (issue 15, item 8)
        assert relative_error(got, expected) < 1e-12
    else:
        baseline = copy.deepcopy(block)(x)
        assert_matches_reference(got, expected, dtype, baseline)


@pytest.mark.slow
@pytest.mark.parametrize("winograd_mode", ["off", "on"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model_eval_error_within_twice_eagers_against_float64(arch, channels_last, winograd_mode, monkeypatch):
    """Whole models: the fused fp32 error against a float64 run at most 2x eager fp32's own, with
    Winograd off and on wherever it takes the conv."""
    monkeypatch.setattr(plan_mod, "WINOGRAD", winograd_mode)
    model = getattr(torchvision.models, arch)()
    randomize_batchnorm(model)
    model.eval()
    fused = fusedres.convert(copy.deepcopy(model), backend="auto")
    x = _x(2, 3, 64, 64, channels_last=channels_last)
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        eager_err = relative_error(model(x), truth)
        got = fused(x)
    kernels = {k for m in fused.modules() if getattr(m, "_eval_plan", None) for k in m._eval_plan.kernels}
    assert kernels == ({plan_mod.ONEDNN} if winograd_mode == "off" else {plan_mod.ONEDNN, plan_mod.WINOGRAD_KERNEL})
    assert isinstance(fused._stem_plan, plan_mod.StemPlan)
    assert relative_error(got, truth) <= 2 * eager_err, (relative_error(got, truth), eager_err)


def test_stage_adds_in_place_into_owned_outputs_only():
    """A converted ResNet stage hands each block's output to the next block, whose identity add
    then writes into it (oneDNN's sum post-op); never into the stage's input, nor into an output
    a hook has seen."""
    model = torchvision.models.resnet18()
    randomize_batchnorm(model)
    model.eval()
    fused = fusedres.convert(copy.deepcopy(model), backend="auto")
    stage = fused.layer1
    assert isinstance(stage, Stage) and list(fused.state_dict()) == list(model.state_dict())
    x = _x(2, 64, 16, 16)
    x_before = x.clone()
    with torch.no_grad():
        expected = copy.deepcopy(model.layer1).double()(x.double())
        assert_matches_reference(stage(x), expected, torch.float32)
        assert_matches_reference(stage(x), expected, torch.float32)
        assert torch.equal(x, x_before), "the stage wrote into its input"
        first = stage[0](x)
        assert stage[1].forward_owned(first).data_ptr() == first.data_ptr(), "the owned input was not reused"
        seen = []
        handle = stage[0].register_forward_hook(lambda module, args, out: seen.append((out, out.clone())))
        assert_matches_reference(stage(x), expected, torch.float32)
        handle.remove()
    out, copy_at_hook = seen[0]
    assert torch.equal(out, copy_at_hook), "a block wrote into an output a hook had seen"
    assert type(to_torchvision(fused).layer1) is nn.Sequential


def test_stage_calls_blocks_with_backward_hooks_through_their_hooks():
    """A block inside a converted stage whose backward hooks must fire is called as a module
    (``forward_owned`` would skip ``nn.Module.__call__``, which installs them)."""
    model = torchvision.models.resnet18()
    fused = fusedres.convert(model, backend="auto").train()
    grads = []
    fused.layer1[1].register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0].shape))
    fused.layer1(_x(2, 64, 8, 8).requires_grad_()).sum().backward()
    assert grads == [(2, 64, 8, 8)]


def test_empty_batch_gives_an_empty_output_and_keeps_the_plan(monkeypatch):
    """A plan made on an empty batch keeps oneDNN (nothing to time Winograd on) and serves the
    next batch."""
    monkeypatch.setattr(plan_mod, "WINOGRAD", "timed")
    block = _block("basic_identity")
    fused = _fused(block)
    fused.backend = "auto"
    with torch.no_grad():
        assert fused(_x(0, 16, 5, 5)).shape == (0, 16, 5, 5)
        plan = fused._eval_plan
        x = _x(2, 16, 5, 5)
        expected = copy.deepcopy(block).double()(x.double())
        assert_matches_reference(fused(x), expected, torch.float32)
    assert fused._eval_plan is plan and plan.kernels == (plan_mod.ONEDNN,) * 2
