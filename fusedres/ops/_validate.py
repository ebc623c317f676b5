"""Argument checks shared by every backend, so all of them reject bad input with the same message."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def integer(value, name: str) -> int:
    """``value`` as an int: Python and NumPy integers (and SymInts under ``torch.compile``), never a
    bool, float, string or tensor, so a bad argument is named instead of failing deep inside."""
    if isinstance(value, torch.SymInt):
        return value  # type: ignore[return-value]
    if isinstance(value, (bool, torch.Tensor)) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return operator.index(value)


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints, as ``(h, w)``."""
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r} is not supported; give an int or a pair of ints")
    if isinstance(value, (list, tuple, torch.Size)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        try:
            return integer(value[0], name), integer(value[1], name)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    try:
        v = integer(value, name)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__} {value!r}") from None
    return (v, v)


def canonical_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the exact strides of a dense contiguous or channels_last tensor.

    A tensor whose size-1 dims carry other strides passes ``is_contiguous`` for either format, and
    oneDNN miscomputes grouped convs on such weights with channels_last input (a (6, 2, 3, 1)
    weight with strides (6, 1, 2, 1): relative error 1.25); such a tensor is copied.
    """
    # Not while tracing (strides may be symbolic); the C++ ops normalise their operands themselves.
    if t.dim() != 4 or torch.compiler.is_compiling():
        return t
    strides = t.stride()
    if strides == _dense_strides(t.shape, channels_last=False) or strides == _dense_strides(t.shape, channels_last=True):
        return t
    # Channels_last unless the tensor is NCHW already: the layout every kernel reads.
    return t.clone(memory_format=torch.contiguous_format if t.is_contiguous() else torch.channels_last)


def _dense_strides(shape, channels_last: bool) -> tuple[int, ...]:
    n, c, h, w = (max(int(v), 1) for v in shape)
    return (c * h * w, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)


def conv_output_hw(
    hw: tuple[int, int], kernel: tuple[int, int], stride, padding, dilation
) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(hw, kernel, stride, padding, dilation)
    )


def check_conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    residual_stride: int,
) -> tuple[int, int, int, int]:
    """Validates the operands of ``conv_bn_act`` and returns the output shape (N, K, P, Q)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (K, C/groups, R, S), got shape {tuple(weight.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    groups = integer(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    n, c, h, w = x.shape
    k, c_per_group, r, s = weight.shape
    # Eager F.conv2d returns a (N, 0, H, W) tensor for C=0 instead of zeros of K channels, and
    # raises for K=0: no backend computes either.
    if c == 0:
        raise ValueError(f"x has no input channels (shape {tuple(x.shape)}); a convolution needs at least one")
    if k == 0:
        raise ValueError(f"weight has no filters (shape {tuple(weight.shape)}); a convolution needs at least one")
    if c % groups or k % groups:
        raise ValueError(f"groups={groups} must divide x's {c} channels and weight's {k} filters")
    if c_per_group * groups != c:
        raise ValueError(
            f"weight expects {c_per_group * groups} input channels ({c_per_group} per group, "
            f"groups={groups}) but x has {c}"
        )
    p, q = conv_output_hw((h, w), (r, s), stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(
            f"x of spatial size {h}x{w} is too small for a {r}x{s} filter with "
            f"padding={padding}, dilation={dilation}"
        )
    for name, vec in (("scale", scale), ("shift", shift)):
        if vec is None:
            continue
        if vec.shape != (k,):
            raise ValueError(f"{name} must have shape ({k},), one value per filter, got {tuple(vec.shape)}")
        if vec.device != x.device:
            raise ValueError(f"{name} is on {vec.device} but x is on {x.device}")
        if not vec.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {vec.dtype}")
    out_shape = (n, k, p, q)
    residual_stride = integer(residual_stride, "residual_stride")
    if residual_stride < 1:
        raise ValueError(f"residual_stride must be positive, got {residual_stride}")
    if residual is not None:
        # Option A: read at [n, k, p*s, q*s], the channels past the residual's are zero.
        s = residual_stride
        shape = tuple(residual.shape)
        fits = len(shape) == 4 and shape[0] == n and shape[1] <= k and all(
            (size + s - 1) // s == out for size, out in zip(shape[2:], (p, q))
        )
        if not fits:
            raise ValueError(
                f"residual must have the output's shape {out_shape} once subsampled by "
                f"residual_stride={s} (with at most {k} channels), got {shape}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} does not match x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    return out_shape


def check_conv_bn_backward(
    grad: torch.Tensor,
    grad_y: torch.Tensor | None,
    grad_coef: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_in: torch.Tensor | None,
    shift_in: torch.Tensor | None,
    mean_in: torch.Tensor | None,
    invstd_in: torch.Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> None:
    """Validates the operands of ``conv_bn_backward`` (same messages as the C++ op)."""
    out_shape = check_conv_bn_act(x, weight, None, None, None, tuple(stride), tuple(padding),
                                  tuple(dilation), groups, 1)
    if tuple(grad.shape) != out_shape:
        raise ValueError(f"grad must have the conv output's shape {out_shape}, got {tuple(grad.shape)}")
    if grad.dtype != x.dtype:
        raise TypeError(f"grad dtype {grad.dtype} does not match x dtype {x.dtype}")
    if grad.device != x.device:
        raise ValueError(f"grad is on {grad.device} but x is on {x.device}")
    if (grad_y is None) != (grad_coef is None):
        raise ValueError("grad_y and grad_coef must be given together")
    if grad_y is not None:
        if grad_y.shape != grad.shape or grad_y.dtype != grad.dtype or grad_y.device != grad.device:
            raise ValueError(
                f"grad_y must have grad's shape, dtype and device {tuple(grad.shape)}, {grad.dtype}, "
                f"{grad.device}; got {tuple(grad_y.shape)}, {grad_y.dtype}, {grad_y.device}"
            )
        k = out_shape[1]
        if tuple(grad_coef.shape) != (4, k) or not grad_coef.is_floating_point() or grad_coef.device != x.device:
            raise ValueError(
                f"grad_coef must be a floating point (4, {k}) tensor (rows mean, grad_scale, mean_g, xhat_coef) on {x.device}, "
                f"got {tuple(grad_coef.shape)} {grad_coef.dtype} on {grad_coef.device}"
            )
    c = x.shape[1]
    given = [t is not None for t in (scale_in, shift_in, mean_in, invstd_in)]
    if any(given) and not all(given):
        raise ValueError("scale_in, shift_in, mean_in and invstd_in must be given together")
    for name, vec in (("scale_in", scale_in), ("shift_in", shift_in), ("mean_in", mean_in), ("invstd_in", invstd_in)):
        if vec is None:
            continue
        if vec.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), one value per input channel, got {tuple(vec.shape)}")
        if vec.device != x.device:
            raise ValueError(f"{name} is on {vec.device} but x is on {x.device}")
        if not vec.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {vec.dtype}")


def _vector(name: str, t, size: int, ref_name: str, ref: torch.Tensor, optional: bool = True) -> None:
    """A per-channel vector of ``size`` floating point values on ``ref``'s device."""
    if t is None:
        if not optional:
            raise ValueError(f"{name} is required")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},), one value per channel, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _activation(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")


def _like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` has ``ref``'s shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _together(**tensors) -> None:
    given = [t is not None for t in tensors.values()]
    if any(given) and not all(given):
        raise ValueError(f"{', '.join(tensors)} must be given together")


def _count(count) -> int:
    count = integer(count, "count")
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    return count


def check_conv_bn_stats(x, weight, scale_in, shift_in, stride, padding, dilation, groups) -> None:
    """Validates the operands of ``conv_bn_stats`` (train mode: statistics need an output pixel)."""
    n, k, p, q = check_conv_bn_act(x, weight, None, None, None, pair(stride, "stride"), pair(padding, "padding"),
                                   pair(dilation, "dilation"), groups, 1)
    if n * p * q == 0:
        raise ValueError(f"batch statistics need at least one output pixel, got an empty batch (x {tuple(x.shape)})")
    _together(scale_in=scale_in, shift_in=shift_in)
    _vector("scale_in", scale_in, x.shape[1], "x", x)
    _vector("shift_in", shift_in, x.shape[1], "x", x)


def check_bn_finalize(mean, m2, count, weight, bias, running_mean, running_var, momentum, eps) -> None:
    """Validates the operands of ``bn_finalize``. The running statistics are updated in place:
    they must not overlap themselves or each other (a stride-0 ``expand``); non-contiguous views
    are fine (``fusedres.ops._dispatch`` writes them back through the view)."""
    if not isinstance(mean, torch.Tensor) or mean.dim() != 1 or not mean.is_floating_point():
        raise ValueError("mean must be a 1-D floating point tensor (one value per channel), got "
                         f"{getattr(mean, 'shape', mean)} {getattr(mean, 'dtype', '')}")
    _like("m2", m2, "mean", mean)
    _count(count)
    k = mean.shape[0]
    _vector("weight", weight, k, "mean", mean)
    _vector("bias", bias, k, "mean", mean)
    _together(running_mean=running_mean, running_var=running_var)
    if running_mean is None:
        return
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _vector(name, t, k, "mean", mean)
        if k > 1 and t.stride(0) == 0:
            raise ValueError(f"{name} has stride 0 (an expanded tensor): its {k} channels share one element "
                             "and cannot be updated in place")
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{name} requires grad and is updated in place (as in eager BatchNorm, a running "
                               "statistic cannot have requires_grad=True)")
    if running_var.dtype != running_mean.dtype:
        raise TypeError(f"running_var dtype {running_var.dtype} does not match running_mean dtype {running_mean.dtype}")
    if not torch.compiler.is_compiling() and _overlap(running_mean, running_var):  # storage pointers: eager only
        raise ValueError("running_mean and running_var share memory; each is updated in place")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    size = a.element_size()

    def span(t):
        start = t.storage_offset() * size
        return start, start + ((t.shape[0] - 1) * t.stride(0) + 1) * size

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_bn_add_act(y, scale, shift, shortcut, shortcut_scale, shortcut_shift, shortcut_stride, relu) -> None:
    """Validates the operands of ``bn_add_act``."""
    _activation("y", y)
    n, k, p, q = y.shape
    _vector("scale", scale, k, "y", y, optional=False)
    _vector("shift", shift, k, "y", y, optional=False)
    shortcut_stride = integer(shortcut_stride, "shortcut_stride")
    if shortcut is None:
        if shortcut_scale is not None or shortcut_shift is not None:
            raise ValueError("shortcut_scale and shortcut_shift need a shortcut")
        return
    _activation("shortcut", shortcut)
    if shortcut.dtype != y.dtype:
        raise TypeError(f"shortcut dtype {shortcut.dtype} does not match y dtype {y.dtype}")
    if shortcut.device != y.device:
        raise ValueError(f"shortcut is on {shortcut.device} but y is on {y.device}")
    if shortcut_stride < 1:
        raise ValueError(f"shortcut_stride must be positive, got {shortcut_stride}")
    s = shortcut_stride
    shape = tuple(shortcut.shape)
    if not (shape[0] == n and shape[1] <= k and (shape[2] + s - 1) // s == p and (shape[3] + s - 1) // s == q):
        raise ValueError(f"shortcut of shape {shape} subsampled by shortcut_stride={s} must give "
                         f"({n}, C <= {k}, {p}, {q}) to match y")
    _vector("shortcut_scale", shortcut_scale, shape[1], "shortcut", shortcut)
    _vector("shortcut_shift", shortcut_shift, shape[1], "shortcut", shortcut)


def _check_bn_backward(grad, y, mean, invstd, act_out, act_scale, act_shift) -> int:
    _activation("y", y)
    _like("grad", grad, "y", y)
    k = y.shape[1]
    _vector("mean", mean, k, "y", y, optional=False)
    _vector("invstd", invstd, k, "y", y, optional=False)
    if act_out is not None:
        _like("act_out", act_out, "y", y)
    _together(act_scale=act_scale, act_shift=act_shift)
    _vector("act_scale", act_scale, k, "y", y)
    _vector("act_shift", act_shift, k, "y", y)
    return k


def check_bn_backward_reduce(grad, y, mean, invstd, act_out, act_scale, act_shift) -> None:
    """Validates the operands of ``bn_backward_reduce``."""
    _check_bn_backward(grad, y, mean, invstd, act_out, act_scale, act_shift)


def check_bn_backward_elemt(grad, y, mean, invstd, weight, sum_g, sum_g_xhat, count, act_out, act_scale,
                            act_shift) -> None:
    """Validates the operands of ``bn_backward_elemt``."""
    k = _check_bn_backward(grad, y, mean, invstd, act_out, act_scale, act_shift)
    _vector("weight", weight, k, "y", y)
    _vector("sum_g", sum_g, k, "y", y, optional=False)
    _vector("sum_g_xhat", sum_g_xhat, k, "y", y, optional=False)
    _count(count)


def check_bn_act_backward(grad_out, out, scale, relu) -> None:
    """Validates the operands of ``bn_act_backward``."""
    _activation("grad_out", grad_out)
    _like("out", out, "grad_out", grad_out)
    _vector("scale", scale, grad_out.shape[1], "grad_out", grad_out)


def _check_conv_bn_act_op(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu,
                          residual_stride=1) -> None:
    check_conv_bn_act(x, weight, scale, shift, residual, pair(stride, "stride"), pair(padding, "padding"),
                      pair(dilation, "dilation"), groups, residual_stride)


def _check_conv_bn_backward_op(grad, grad_y, grad_coef, x, weight, scale_in, shift_in, mean_in, invstd_in, stride,
                               padding, dilation, groups, output_mask) -> None:
    check_conv_bn_backward(grad, grad_y, grad_coef, x, weight, scale_in, shift_in, mean_in, invstd_in,
                           pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"), groups)
    if len(output_mask) != 2:
        raise ValueError(f"output_mask must have 2 entries (grad_input, grad_weight), got {output_mask!r}")


# The one validation of every registered op, run before any backend is called (fusedres.ops._dispatch).
CHECKS = {
    "conv_bn_act": _check_conv_bn_act_op,
    "bn_act_backward": check_bn_act_backward,
    "conv_bn_stats": check_conv_bn_stats,
    "bn_finalize": check_bn_finalize,
    "bn_add_act": check_bn_add_act,
    "bn_backward_reduce": check_bn_backward_reduce,
    "bn_backward_elemt": check_bn_backward_elemt,
    "conv_bn_backward": _check_conv_bn_backward_op,
}
