"""fusedres composes with the rest of PyTorch: dtype/device moves, state_dict, save/load,
deepcopy, autocast with GradScaler, torch.compile in train mode, deterministic reductions."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision
from torch import nn

import fusedres
from tests.conftest import assert_fused_ran, assert_matches_reference, fused_backends, fused_ops, randomize_batchnorm

BACKEND = fused_backends("cpu")[0]


def _models(arch="resnet18"):
    model = getattr(torchvision.models, arch)()
    randomize_batchnorm(model)
    return model, fusedres.convert(copy.deepcopy(model), backend=BACKEND)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_dtype"])
def test_dtype_moves_keep_the_fused_path(cast):
    model, fused = _models()
    x = torch.randn(2, 3, 32, 32)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    truth = copy.deepcopy(model).double().eval()(x.double())
    move = {"half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(), "to_dtype": lambda m: m.to(dtype)}[cast]
    with torch.no_grad():
        got = move(fused).eval()(x.to(dtype))
        base = move(model).eval()(x.to(dtype))
    assert got.dtype == dtype
    assert_matches_reference(got, truth, dtype, base, what=f"{cast} logits")


def test_state_dict_round_trip_and_save_load():
    model, fused = _models("resnet50")
    fused.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = fused(x)
    back = torchvision.models.resnet50()
    back.load_state_dict(fused.state_dict())
    # Pinned to the same backend as ``fused``: ``auto`` picks by timing, and a bitwise comparison
    # across backends would depend on which one won.
    again = fusedres.convert(torchvision.models.resnet50(), backend=BACKEND)
    again.load_state_dict(back.state_dict())
    buffer = io.BytesIO()
    torch.save(again, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    clone = pickle.loads(pickle.dumps(copy.deepcopy(loaded)))
    with torch.no_grad():
        assert_matches_reference(back.eval()(x), expected.double(), torch.float32, what="torchvision model")
        for net in (loaded, clone):  # same weights, same fused kernels: the same bits
            assert torch.equal(net(x), expected)
    assert isinstance(clone.layer1[0], fusedres.Bottleneck)


def test_autocast_bf16_train_step_with_grad_scaler():
    """bf16 autocast + GradScaler: fusedres lands as close to the fp32 step as eager autocast does."""
    model, fused = _models()
    x, target = torch.randn(16, 3, 64, 64), torch.randint(0, 1000, (16,))

    def step(net, autocast: bool):
        net = copy.deepcopy(net).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", enabled=autocast)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x)
            loss = nn.functional.cross_entropy(out, target)
        scaler.scale(loss).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        scaler.step(opt)
        scaler.update()
        return out, loss, grads, list(net.buffers())

    out, loss, grads, buffers = step(fused, True)
    out_e, loss_e, grads_e, buffers_e = step(model, True)
    _, loss_t, grads_t, buffers_t = step(model, False)
    assert out.dtype == out_e.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads) and buffers[0].dtype == torch.float32
    assert abs(loss.item() - loss_t.item()) <= 2 * abs(loss_e.item() - loss_t.item()) + 1e-2
    for g, g_e, g_t in zip(grads, grads_e, grads_t):
        err, err_e = ((g - g_t).norm() / g_t.norm()).item(), ((g_e - g_t).norm() / g_t.norm()).item()
        assert err <= 2 * err_e + 0.02, (err, err_e)
    for b, b_e, b_t in zip(buffers, buffers_e, buffers_t):
        if b.is_floating_point():
            assert (b - b_t).abs().max() <= 2 * (b_e - b_t).abs().max() + 1e-2


def test_train_mode_compiles_without_graph_breaks():
    model, fused = _models()
    fused.train()
    x = torch.randn(2, 3, 32, 32)
    explanation = torch._dynamo.explain(fused)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    traced = {str(node.target) for graph in explanation.graphs for sub in graph.modules()
              if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes}
    assert any(t.startswith("fusedres.") for t in traced), "the compiled graph holds no fusedres op"
    torch._dynamo.reset()
    module = copy.deepcopy(fused)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    ref = copy.deepcopy(fused)
    out = compiled(x)
    with fused_ops() as log:
        out_ref = ref(x)
    assert_fused_ran(log, BACKEND)
    assert_matches_reference(out, out_ref.double(), torch.float32)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    for (name, p), p_ref in zip(module.named_parameters(), ref.parameters()):
        assert_matches_reference(p.grad, p_ref.grad.double(), torch.float32, what=f"grad of {name}")
    for (name, b), b_ref in zip(module.named_buffers(), ref.buffers()):
        assert torch.allclose(b.double(), b_ref.double(), rtol=1e-5, atol=1e-6), name
    torch._dynamo.reset()


def test_statistics_reductions_are_deterministic():
    _, fused = _models()
    fused.train()
    x = torch.randn(4, 3, 32, 32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            net = copy.deepcopy(fused)
            out = net(x)
            out.square().sum().backward()
            runs.append([out] + [p.grad for p in net.parameters()] + list(net.buffers()))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
