"""Argument checks shared by every backend, so all of them reject bad input with the same message."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values  # type: ignore[return-value]


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
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    n, c, h, w = x.shape
    k, c_per_group, r, s = weight.shape
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
