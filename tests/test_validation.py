"""Bad input gets an error naming the argument; unsupported cases fall back visibly."""

from __future__ import annotations

import warnings

import pytest
import torch

import fusedres
from fusedres import backends

X = lambda *shape, **kw: torch.randn(*shape, **kw)  # noqa: E731


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=X(2, 4, 5)), ValueError, "x must be 4-D"),
        (dict(weight=X(6, 4, 3)), ValueError, "weight must be 4-D"),
        (dict(x=torch.ones(1, 4, 5, 5, dtype=torch.int32)), TypeError, "x must be a floating point"),
        (dict(weight=X(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight dtype torch.float64 does not match"),
        (dict(weight=X(6, 3, 3, 3)), ValueError, "weight expects 3 input channels"),
        (dict(groups=3), ValueError, "groups=3 must divide"),
        (dict(groups=0), ValueError, "groups must be positive"),
        (dict(stride=0), ValueError, "stride must be positive"),
        (dict(stride=(1, 2, 3)), ValueError, "stride must be an int or a pair"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(dilation=0), ValueError, "dilation must be positive"),
        (dict(x=X(1, 4, 2, 2), padding=0), ValueError, "too small for a 3x3 filter"),
        (dict(scale=X(5)), ValueError, r"scale must have shape \(6,\)"),
        (dict(shift=torch.ones(6, dtype=torch.int64)), TypeError, "shift must be floating point"),
        (dict(residual=X(1, 6, 4, 4)), ValueError, "residual must have the output's shape"),
        (dict(residual=X(1, 3, 5, 5), residual_stride=0), ValueError, "residual_stride must be positive"),
        (dict(residual=X(1, 6, 5, 5, dtype=torch.float64)), TypeError, "residual dtype"),
        (dict(backend="cutlass"), ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_conv_bn_act_rejects_bad_arguments(kwargs, error, match):
    args = dict(x=X(1, 4, 5, 5), weight=X(6, 4, 3, 3), padding=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fusedres.conv_bn_act(**args)


def test_empty_batch_gives_empty_output():
    for backend in ["reference"] + [b for b in ("native",) if backends.unusable_reason(b, torch.device("cpu"), torch.float32) is None]:
        out = fusedres.conv_bn_act(X(0, 4, 5, 5), X(6, 4, 3, 3), padding=1, backend=backend)
        assert out.shape == (0, 6, 5, 5), backend


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mix needs a CUDA GPU")
def test_device_mix_names_the_argument():
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        fusedres.conv_bn_act(X(1, 4, 5, 5, device="cuda"), X(6, 4, 3, 3))


def test_unusable_backend_falls_back_once_with_reason(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    x64, w64 = X(1, 4, 5, 5, dtype=torch.float64), X(6, 4, 3, 3, dtype=torch.float64)
    expected_fallback = "triton" if backends.unusable_reason("triton", x64.device, torch.float64) is None else "reference"
    with pytest.warns(UserWarning, match=rf"backend 'native' falls back to '{expected_fallback}' \(.*\): the native kernels do not support torch.float64"):
        fusedres.conv_bn_act(x64, w64, backend="native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedres.conv_bn_act(x64, w64, backend="native")  # warned once only



def test_old_backend_name_cuda_is_a_deprecated_alias_of_native(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(FutureWarning, match="'cuda' is now called 'native'"):
        assert backends.check_backend("cuda") == "native"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.check_backend("cuda") == "native"  # warned once only
    assert "C++ CPU kernels" in backends.kernels_of("native", torch.device("cpu"))
    assert "CUDA kernels" in backends.kernels_of("native", torch.device("cuda"))


def test_triton_on_cpu_without_interpreter_is_unusable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends.unusable_reason("triton", torch.device("cpu"), torch.float32)
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def _conv_bn_backward_args(**changes):
    """conv 4 -> 6 channels, 3x3, padding 1, on 5x5: valid unless changed."""
    k = lambda n: torch.rand(n) + 0.5  # noqa: E731
    args = dict(grad=X(1, 6, 5, 5), grad_y=X(1, 6, 5, 5), grad_coef=X(4, 6), x=X(1, 4, 5, 5), weight=X(6, 4, 3, 3),
                scale_in=k(4), shift_in=k(4), mean_in=k(4), invstd_in=k(4), stride=[1, 1], padding=[1, 1],
                dilation=[1, 1], groups=1, output_mask=[True, True])
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(grad=X(1, 6, 4, 4)), "grad must have the conv output's shape"),
        (dict(grad=X(1, 6, 5, 5, dtype=torch.float64)), "grad dtype .* does not match x dtype"),
        (dict(grad_y=None), "grad_y and grad_coef must be given together"),
        (dict(grad_coef=X(3, 6)), "grad_coef must"),
        (dict(mean_in=None), "scale_in, shift_in, mean_in and invstd_in must be given together"),
        (dict(invstd_in=X(5)), r"invstd_in must have shape \(4,\)"),
        (dict(weight=X(6, 3, 3, 3)), "input channels"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("backend", [b for b in ("native", "triton")
                                     if backends.unusable_reason(b, torch.device("cpu"), torch.float32) is None])
def test_conv_bn_backward_rejects_bad_arguments(backend, changes, match):
    from fusedres.ops._dispatch import op_for

    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op_for("conv_bn_backward", backend)(**_conv_bn_backward_args(**changes))


# --- One validation for every backend (fusedres.ops._validate.CHECKS, run by _dispatch.op_for) ---

ALL_BACKENDS = [b for b in ("native", "triton") if backends.unusable_reason(b, torch.device("cpu"), torch.float32) is None] + ["reference"]


def _train_op_args(name: str, **changes) -> dict:
    """Valid operands of each train-mode op (K=4 channels), with ``changes`` applied."""
    k = lambda n=4: torch.rand(n) + 0.5  # noqa: E731
    y = X(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    args = {
        "conv_bn_stats": dict(x=X(2, 3, 5, 5), weight=X(4, 3, 3, 3), scale_in=k(3), shift_in=k(3), stride=[1, 1],
                              padding=[1, 1], dilation=[1, 1], groups=1),
        "bn_finalize": dict(mean=X(4), m2=k() * 8, count=9, weight=k(), bias=k(), running_mean=X(4),
                            running_var=k(), momentum=0.1, eps=1e-5),
        "bn_add_act": dict(y=y, scale=k(), shift=k(), shortcut=X(2, 4, 5, 5), shortcut_scale=None, shortcut_shift=None,
                           shortcut_stride=1, relu=True),
        "bn_backward_reduce": dict(grad=X(2, 4, 5, 5), y=y, mean=k(), invstd=k(), act_out=None, act_scale=k(),
                                   act_shift=k()),
        "bn_backward_elemt": dict(grad=X(2, 4, 5, 5), y=y, mean=k(), invstd=k(), weight=k(), sum_g=k(),
                                  sum_g_xhat=k(), count=50, act_out=None, act_scale=k(), act_shift=k()),
        "bn_act_backward": dict(grad_out=X(2, 4, 5, 5), out=y, scale=k(), relu=True),
    }[name]
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "name,changes,error,match",
    [
        ("conv_bn_stats", dict(x=X(2, 6, 5, 5)), ValueError, "weight expects 3 input channels"),
        ("conv_bn_stats", dict(scale_in=torch.rand(4)), ValueError, r"scale_in must have shape \(3,\)"),
        ("conv_bn_stats", dict(shift_in=None), ValueError, "scale_in, shift_in must be given together"),
        ("conv_bn_stats", dict(x=X(0, 3, 5, 5)), ValueError, "batch statistics need at least one output pixel"),
        ("bn_finalize", dict(m2=torch.rand(3)), ValueError, r"m2 must have the shape of mean \(4,\)"),
        ("bn_finalize", dict(count=0), ValueError, "count must be positive"),
        ("bn_finalize", dict(running_mean=torch.zeros(1).expand(4)), ValueError, "running_mean has stride 0"),
        ("bn_finalize", dict(running_var=torch.ones(4, dtype=torch.int64)), TypeError, "running_var must be floating point"),
        ("bn_finalize", dict(running_mean=torch.zeros(5)), ValueError, r"running_mean must have shape \(4,\)"),
        ("bn_finalize", dict(running_var=None), ValueError, "running_mean, running_var must be given together"),
        ("bn_finalize", dict(weight=torch.rand(3)), ValueError, r"weight must have shape \(4,\)"),
        ("bn_add_act", dict(shortcut_stride=0), ValueError, "shortcut_stride must be positive"),
        ("bn_add_act", dict(shortcut=X(2, 5, 5, 5)), ValueError, "shortcut of shape"),
        ("bn_add_act", dict(scale=torch.rand(3)), ValueError, r"scale must have shape \(4,\)"),
        ("bn_add_act", dict(shortcut=None, shortcut_scale=torch.rand(4)), ValueError, "need a shortcut"),
        ("bn_add_act", dict(shortcut=X(2, 4, 5, 5, dtype=torch.float64)), TypeError, "shortcut dtype"),
        ("bn_backward_reduce", dict(grad=X(2, 4, 5, 4)), ValueError, "grad must have the shape of y"),
        ("bn_backward_reduce", dict(act_shift=None), ValueError, "act_scale, act_shift must be given together"),
        ("bn_backward_reduce", dict(mean=torch.ones(4, dtype=torch.int64)), TypeError, "mean must be floating point"),
        ("bn_backward_elemt", dict(sum_g=torch.rand(5)), ValueError, r"sum_g must have shape \(4,\)"),
        ("bn_backward_elemt", dict(act_out=X(2, 4, 4, 5)), ValueError, "act_out must have the shape of y"),
        ("bn_backward_elemt", dict(count=0), ValueError, "count must be positive"),
        ("bn_act_backward", dict(out=X(2, 4, 5, 4)), ValueError, "out must have the shape of grad_out"),
        ("bn_act_backward", dict(scale=torch.rand(3)), ValueError, r"scale must have shape \(4,\)"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_train_ops_reject_bad_operands_on_every_backend(backend, name, changes, error, match):
    from fusedres.ops._dispatch import op_for

    args = _train_op_args(name, **changes)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=match):
        op_for(name, backend)(**args)
    for key, value in before.items():  # rejected before any kernel wrote anything
        assert torch.equal(args[key], value), key


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_running_statistics_are_updated_through_the_view(backend):
    from fusedres.ops import _ref
    from fusedres.ops._dispatch import op_for

    args = _train_op_args("bn_finalize")
    mean_buf, var_buf = torch.full((8,), 7.0), torch.full((8,), 9.0)
    mean_buf[1::2], var_buf[1::2] = args["running_mean"], args["running_var"]
    dense = dict(args, running_mean=args["running_mean"].clone(), running_var=args["running_var"].clone())
    expected = _ref.bn_finalize(**dense)
    got = op_for("bn_finalize", backend)(**dict(args, running_mean=mean_buf[1::2], running_var=var_buf[1::2]))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(mean_buf[1::2], dense["running_mean"])
    torch.testing.assert_close(var_buf[1::2], dense["running_var"])
    assert torch.equal(mean_buf[0::2], torch.full((4,), 7.0)) and torch.equal(var_buf[0::2], torch.full((4,), 9.0))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_train_block_on_the_wrong_channel_count_raises(backend):
    block = fusedres.BasicBlock(8, 8, backend=backend).train()
    before = block.bn1.running_mean.clone()
    with pytest.raises(ValueError, match="weight expects 8 input channels"):
        block(X(2, 6, 8, 8))
    assert torch.equal(block.bn1.running_mean, before)
