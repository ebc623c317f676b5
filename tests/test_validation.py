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
        (dict(backend="cudnn"), ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_conv_bn_act_rejects_bad_arguments(kwargs, error, match):
    args = dict(x=X(1, 4, 5, 5), weight=X(6, 4, 3, 3), padding=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fusedres.conv_bn_act(**args)


def test_empty_batch_gives_empty_output():
    for backend in ["reference"] + [b for b in ("cuda",) if backends.unusable_reason(b, torch.device("cpu"), torch.float32) is None]:
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
    with pytest.warns(UserWarning, match=rf"backend 'cuda' falls back to '{expected_fallback}': the cuda kernels do not support torch.float64"):
        fusedres.conv_bn_act(x64, w64, backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedres.conv_bn_act(x64, w64, backend="cuda")  # warned once only


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
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton")
                                     if backends.unusable_reason(b, torch.device("cpu"), torch.float32) is None])
def test_conv_bn_backward_rejects_bad_arguments(backend, changes, match):
    from fusedres.ops._dispatch import op_for

    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op_for("conv_bn_backward", backend)(**_conv_bn_backward_args(**changes))
