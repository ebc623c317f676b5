"""A converted block's eval launch plan: made once, reused, and never stale.

Each change a user can make to what the folded, packed weights depend on must rebuild the plan
(or, while autograd records, bypass it), and the output must then match the block's unfused
forward. Run on every backend the CPU has: oneDNN (``auto``) and the named C++ kernels.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fusedres
from fusedres.nn import plan as plan_mod
from fusedres.ops import bn_fold, winograd
from tests.conftest import assert_matches_reference, fused_backends, randomize_batchnorm, relative_error

CL = torch.channels_last
# "auto+winograd": backend auto, stride 1, its 3x3 conv on Winograd (plan.WINOGRAD "on").
BACKENDS = ["auto", "auto+winograd"] + [b for b in fused_backends("cpu") if b == "native"]


@pytest.fixture(autouse=True)
def _winograd_mode(request, monkeypatch):
    """Winograd only where the test asks for it (the default, "timed", depends on timing)."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    monkeypatch.setattr(plan_mod, "WINOGRAD", "on" if params.get("backend") == "auto+winograd" else "off")


def _block(backend: str) -> fusedres.Bottleneck:
    stride = 1 if backend == "auto+winograd" else 2
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride, bias=False), nn.BatchNorm2d(16))
    block = fusedres.Bottleneck(8, 4, stride, downsample, backend=backend.partition("+")[0])
    randomize_batchnorm(block)
    return block.eval()


def _x():
    return torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)


def _check(block, x, what: str) -> None:
    """The fused output equals the unfused forward (computed in float64) after ``what``."""
    with torch.no_grad():
        got = block(x)
        expected = copy.deepcopy(block).double().forward_unfused(x.double())
    assert_matches_reference(got, expected, torch.float32, what=f"after {what}")


def _warm(block, x) -> plan_mod.EvalPlan:
    with torch.no_grad():
        block(x)
        plan = block._eval_plan
        block(x)
    assert plan is not None and block._eval_plan is plan, "the plan is not kept between calls"
    return plan


@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_state_reuses_the_plan_without_folding(backend, monkeypatch):
    block, x = _block(backend), _x()
    plan = _warm(block, x)
    folds = []
    monkeypatch.setattr(plan_mod, "fold", lambda *a: folds.append(a) or bn_fold.fold(*a))
    with torch.no_grad():
        for _ in range(3):
            block(x)
            block(torch.randn(1, 8, 5, 5))  # another shape: same plan
    assert block._eval_plan is plan and not folds
    kernels = {"auto": (plan_mod.ONEDNN,) * 4, "native": ("native",) * 4,
               "auto+winograd": (plan_mod.ONEDNN, plan_mod.WINOGRAD_KERNEL, plan_mod.ONEDNN, plan_mod.ONEDNN)}
    assert plan.kernels == kernels[backend]


def _changes():
    """(name, change(block)) for every kind of change the plan must see."""

    def optimizer_step(b):
        opt = torch.optim.SGD(b.parameters(), lr=0.1)
        for p in b.parameters():
            p.grad = torch.randn_like(p)
        opt.step()

    def load_state_dict(b):
        state = copy.deepcopy(b.state_dict())
        for key, value in state.items():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5)
        b.load_state_dict(state)

    def load_state_dict_assign(b):
        state = {k: (torch.rand_like(v) + 0.5 if v.is_floating_point() else v) for k, v in b.state_dict().items()}
        b.load_state_dict(state, assign=True)

    def to_and_back(b):
        b.double()
        with torch.no_grad():
            b.bn3.running_mean.add_(1.0)
        b.float()

    def train_step_then_eval(b):
        b.train()
        with torch.no_grad():
            b(3 * _x() + 1)  # updates the running statistics (issue 15, item 1)
        b.eval()

    def bn_buffer_in_place(b):
        with torch.no_grad():
            b.bn2.running_var.mul_(3.0)
            b.downsample[1].running_mean.sub_(0.5)

    def eps(b):
        b.bn1.eps = 0.5  # issue 15, item 2

    def momentum_and_eps_of_projection(b):
        b.downsample[1].momentum = 0.5
        b.downsample[1].eps = 0.25

    def data_assignment(b):
        b.conv2.weight.data = torch.randn_like(b.conv2.weight)

    def parameter_replaced(b):
        b.conv1.weight = nn.Parameter(torch.randn_like(b.conv1.weight))

    def module_replaced(b):
        b.bn3 = copy.deepcopy(b.bn3)
        with torch.no_grad():
            b.bn3.weight.mul_(-1.0)

    def conv_bias_added(b):
        b.conv3.bias = nn.Parameter(torch.randn(b.conv3.out_channels))

    def requires_grad_then_no_grad_step(b):
        b.conv1.weight.requires_grad_(True)
        with torch.no_grad():
            b.conv1.weight.add_(0.1)

    return [optimizer_step, load_state_dict, load_state_dict_assign, to_and_back, train_step_then_eval,
            bn_buffer_in_place, eps, momentum_and_eps_of_projection, data_assignment, parameter_replaced,
            module_replaced, conv_bias_added, requires_grad_then_no_grad_step]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_is_rebuilt_after(change, backend):
    block, x = _block(backend), _x()
    old = _warm(block, x)
    change(block)
    _check(block, x, change.__name__)
    assert block._eval_plan is not old, "the stale plan was kept"
    _check(block, x, f"{change.__name__} (steady state)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtype_and_mode_changes_rebuild_or_bypass(backend):
    block, x = _block(backend), _x()
    old = _warm(block, x)
    with torch.inference_mode():
        _check(block, x, "inference_mode")
    assert block._eval_plan is not old
    # While autograd records, the differentiable ops run and gradients flow.
    block.conv1.weight.requires_grad_(True)
    out = block(x)
    out.sum().backward()
    assert block.conv1.weight.grad is not None and block.conv1.weight.grad.abs().sum() > 0


def test_train_mode_drops_the_plan():
    block, x = _block("auto"), _x()
    _warm(block, x)
    block.train()
    with torch.no_grad():
        block(x)
    assert block._eval_plan is None


def test_copies_and_pickles_make_their_own_plan():
    block, x = _block("auto"), _x()
    _warm(block, x)
    for other in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert other._eval_plan is None
        _check(other, x, "a copy")
        with torch.no_grad():
            other.conv1.weight.mul_(2.0)
        _check(block, x, "changing a copy")  # the original's plan is still right


def test_fold_cache_keys_eps_and_folds_float64_in_float64():
    """The per-conv fold (differentiable path, named backends) sees eps, and a float64 conv and
    BN fold in float64 (issue 15, items 2 and 8)."""
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True).double(), nn.BatchNorm2d(6).double()
    randomize_batchnorm(nn.ModuleList([conv, bn]))
    bn.eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        weight, shift = bn_fold.fold_conv_bn(conv, bn)
        assert weight.dtype == shift.dtype == torch.float64
        got = torch.conv2d(x, weight, shift, padding=1)
        assert relative_error(got, bn(conv(x))) < 1e-13
        bn.eps = 0.5
        weight, shift = bn_fold.fold_conv_bn(conv, bn)
        assert relative_error(torch.conv2d(x, weight, shift, padding=1), bn(conv(x))) < 1e-13


def test_compiling_a_block_with_a_plan_traces_the_fused_ops():
    """Under torch.compile the plan is not traced (it is host-side caching): the registered fused
    ops are, with no graph break, and the result is right."""
    block, x = _block("auto"), _x()
    _warm(block, x)
    with torch.no_grad():
        explanation = torch._dynamo.explain(block)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(block, fullgraph=True)
        expected = copy.deepcopy(block).double().forward_unfused(x.double())
        assert_matches_reference(compiled(x), expected, torch.float32)
    torch._dynamo.reset()


@pytest.mark.parametrize("winograd_faster", [True, False])
def test_timed_winograd_is_chosen_only_where_it_measures_faster(winograd_faster, monkeypatch):
    """``plan.WINOGRAD == "timed"``: a conv Winograd takes runs on it when it times under
    ``WINOGRAD_MARGIN`` of oneDNN's time on the plan's first input, else on oneDNN."""
    block, x = _block("auto+winograd"), _x()
    monkeypatch.setattr(plan_mod, "WINOGRAD", "timed")
    timed = []

    def fake_median(packed, h):
        is_winograd = isinstance(packed, winograd.PackedWinograd)
        timed.append(is_winograd)
        return 1.0 if is_winograd == winograd_faster else 2.0

    monkeypatch.setattr(plan_mod, "_median_seconds", fake_median)
    monkeypatch.setattr(plan_mod, "_winograd_faster", {})
    plan = _warm(block, x)
    assert sorted(timed) == [False, True], "only the 3x3 stride-1 conv is timed, once per candidate"
    expected = plan_mod.WINOGRAD_KERNEL if winograd_faster else plan_mod.ONEDNN
    assert plan.kernels == (plan_mod.ONEDNN, expected, plan_mod.ONEDNN, plan_mod.ONEDNN)
    _check(block, x, "the timed choice")
    with torch.no_grad():  # a weight update remakes the plan, and reuses the timing
        block.conv2.weight.mul_(0.5)
    _check(block, x, "a remade plan")
    assert block._eval_plan is not plan and block._eval_plan.kernels == plan.kernels and len(timed) == 2
