"""A converted torchvision ResNet: same object, state and result, with its eval stem
(conv1 -> bn1 -> relu) as one oneDNN call (``fusedres.nn.plan.StemPlan``) that is never stale,
and torchvision's stem wherever the plan does not serve."""

from __future__ import annotations

import copy
import pickle
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres.nn import plan as plan_mod
from fusedres.nn.convert import to_torchvision
from fusedres.nn.resnet import ResNet
from fusedres.ops import onednn
from tests.conftest import assert_matches_reference, randomize_batchnorm

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.skipif(onednn.unusable_reason(torch.device("cpu"), torch.float32) is not None,
                                reason="the fused stem runs on oneDNN")
CL = torch.channels_last


class _Ops(TorchDispatchMode):
    """Counts the ATen and mkldnn ops dispatched inside (``ops["aten.native_batch_norm"]``...)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    randomize_batchnorm(model)
    return model.eval()


def _x(layout=CL) -> torch.Tensor:
    return torch.randn(2, 3, 40, 40).contiguous(memory_format=layout)


def _expected(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plain = to_torchvision(copy.deepcopy(model)).double()
    with torch.no_grad():
        return plain(x.double())


def _stem_ops(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Counter]:
    """The model's output and the ops its stem dispatched."""
    with torch.no_grad(), _Ops() as ops:
        out = model.stem(x)
    return out, ops.counts


def test_convert_keeps_object_state_and_result():
    model = _model()
    keys = list(model.state_dict())
    converted = fusedres.convert(model)
    assert converted is model and type(model) is ResNet
    assert list(model.state_dict()) == keys
    for layout in (CL, torch.contiguous_format):
        x = _x(layout)
        with torch.no_grad():
            got = model(x)
        assert_matches_reference(got, _expected(model, x), torch.float32, what=f"{layout} input")
    assert type(to_torchvision(model)) is torchvision.models.ResNet and "_stem_plan" not in model.__dict__


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_eval_stem_is_one_onednn_call(layout):
    model, x = fusedres.convert(_model()), _x(layout)
    with torch.no_grad():
        model(x)
    plan = model._stem_plan
    assert isinstance(plan, plan_mod.StemPlan)
    out, ops = _stem_ops(model, x)
    assert model._stem_plan is plan, "the plan is not kept between calls"
    convs = ops.pop("mkldnn._convolution_pointwise")
    assert convs == 1 and not {k for k in ops if "batch_norm" in k or "relu" in k or "convolution" in k}, ops
    assert out.is_contiguous(memory_format=CL)
    bn = model.bn1
    with torch.no_grad():
        conv = nn.functional.conv2d(x.double(), model.conv1.weight.double(), None, 2, 3)
        expected = torch.relu(nn.functional.batch_norm(conv, bn.running_mean.double(), bn.running_var.double(),
                                                       bn.weight.double(), bn.bias.double(), eps=bn.eps))
    assert_matches_reference(out, expected, torch.float32, what="stem")


def _changes():
    def optimizer_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()

    def load_state_dict(m):
        state = {k: (torch.rand_like(v) + 0.5 if k.startswith(("conv1.", "bn1.")) and v.is_floating_point() else v)
                 for k, v in m.state_dict().items()}
        m.load_state_dict(state)

    def train_step_then_eval(m):
        m.train()
        with torch.no_grad():
            m(3 * _x() + 1)
        m.eval()

    def bn_buffer_in_place(m):
        with torch.no_grad():
            m.bn1.running_var.mul_(3.0)

    def eps(m):
        m.bn1.eps = 0.5

    def to_and_back(m):
        m.double()
        with torch.no_grad():
            m.bn1.running_mean.add_(1.0)
        m.float()

    def module_replaced(m):
        m.conv1 = copy.deepcopy(m.conv1)
        with torch.no_grad():
            m.conv1.weight.mul_(-1.0)

    def backend_pinned(m):
        m.backend = "native"

    return [optimizer_step, load_state_dict, train_step_then_eval, bn_buffer_in_place, eps, to_and_back,
            module_replaced, backend_pinned]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_stem_plan_is_rebuilt_after(change):
    model, x = fusedres.convert(_model()), _x()
    with torch.no_grad():
        model(x)
    old = model._stem_plan
    assert old is not None
    change(model)
    with torch.no_grad():
        got = model(x)
    assert model._stem_plan is not old, "the stale plan was kept"
    if change.__name__ == "backend_pinned":
        assert model._stem_plan is None, "a named backend runs its own kernels, not the oneDNN stem"
    assert_matches_reference(got, _expected(model, x), torch.float32, what=f"after {change.__name__}")


def test_stem_runs_torchvisions_ops_where_the_plan_does_not_serve():
    model, x = fusedres.convert(_model()), _x()
    # Autograd records: gradients reach conv1 through torchvision's stem.
    out = model(x)
    out.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model._stem_plan is None
    # A hook on bn1 sees its call.
    seen = []
    handle = model.bn1.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen == [(2, 64, 20, 20)]
    # Train mode: batch statistics.
    model.train()
    before = model.bn1.running_mean.clone()
    with torch.no_grad():
        model(x)
    assert not torch.equal(before, model.bn1.running_mean) and model._stem_plan is None


def test_copies_and_pickles_make_their_own_stem_plan():
    model, x = fusedres.convert(_model()), _x()
    with torch.no_grad():
        model(x)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(other) is ResNet and other._stem_plan is None
        with torch.no_grad():
            other.conv1.weight.mul_(2.0)
            assert_matches_reference(model(x), _expected(model, x), torch.float32, what="after changing a copy")


def test_compiling_a_converted_resnet_has_no_graph_break():
    model, x = fusedres.convert(_model()), _x()
    with torch.no_grad():
        model(x)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
