"""Unfused PyTorch references: the ground truth for every fused op.

Same math as the kernels, written with plain ops and no tricks. Tests and benchmarks import
these; the ``reference`` backend runs them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fusedres.ops._aten import convolution_backward


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation type: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _shortcut_term(
    shortcut: torch.Tensor,
    shortcut_scale: Optional[torch.Tensor],
    shortcut_shift: Optional[torch.Tensor],
    out_channels: int,
    stride: int,
    acc: torch.dtype,
) -> torch.Tensor:
    """``shortcut[:, :, ::stride, ::stride]`` (affine if given), channels zero-extended to K.

    With stride 1 and as many channels as the output this is the identity (or projection)
    shortcut; with stride 2 and fewer channels it is the paper's parameter-free option A.
    """
    s = shortcut[:, :, ::stride, ::stride].to(acc)
    if shortcut_scale is not None:
        s = s * _per_channel(shortcut_scale.to(acc))
    if shortcut_shift is not None:
        s = s + _per_channel(shortcut_shift.to(acc))
    return F.pad(s, (0, 0, 0, 0, 0, out_channels - s.shape[1]))


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    residual_stride: int = 1,
) -> torch.Tensor:
    """``act(conv(x, weight) * scale + shift + residual)``; absent operands are 1 / 0 / 0.

    ``residual`` has the output's shape, or is option A's shortcut (see ``_shortcut_term``):
    read at ``[:, :, ::residual_stride, ::residual_stride]``, channels past its own zero.
    The affine is computed in fp32 and rounded once to ``x.dtype`` at the end, like the kernels.
    """
    acc = _acc_dtype(x.dtype)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups).to(acc)
    if scale is not None:
        y = y * _per_channel(scale.to(acc))
    if shift is not None:
        y = y + _per_channel(shift.to(acc))
    if residual is not None:
        y = y + _shortcut_term(residual, None, None, y.shape[1], residual_stride, acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def bn_act_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    scale: Optional[torch.Tensor],
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the epilogue ``out = act(conv(x, weight) * scale + shift + residual)``.

    Returns ``(grad_conv, grad_shift)``: ``g = grad_out * act'(out)``,
    ``grad_conv = g * scale`` (in the dtype of ``grad_out``) and ``grad_shift = sum(g)`` over
    N, H, W in fp32. ``g`` is also the residual's gradient.
    """
    acc = _acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    if relu:
        g = torch.where(out > 0, g, torch.zeros_like(g))
    grad_shift = g.sum(dim=(0, 2, 3))
    grad_conv = g * _per_channel(scale.to(acc)) if scale is not None else g
    grad_conv = grad_conv.to(grad_out.dtype).contiguous(memory_format=torch.channels_last)
    return grad_conv, grad_shift


def fold_bn(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm with running statistics as a per-channel affine: ``(scale, shift)`` in fp32."""
    scale = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -running_mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


# --- train mode: BatchNorm statistics in the conv epilogue, BN+ReLU in the next prologue ---


def bn_act(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The prologue transform ``relu(y * scale + shift)``, in ``y.dtype``."""
    acc = _acc_dtype(y.dtype)
    return torch.relu(y.to(acc) * _per_channel(scale.to(acc)) + _per_channel(shift.to(acc))).to(y.dtype)


def conv_bn_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_in: Optional[torch.Tensor],
    shift_in: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = conv(prologue(x), weight)`` and its per-channel ``(mean, m2)`` over N, H, W.

    ``prologue(x) = relu(x * scale_in + shift_in)`` when ``scale_in``/``shift_in`` are given (the
    previous layer's BN+ReLU, applied before zero padding), else ``x``. ``y`` is in ``x.dtype``,
    channels_last; ``mean`` and ``m2 = sum((y - mean)^2)`` are fp32 (fp64 for fp64 inputs) and
    describe ``y`` as stored. Kernels merge per-tile partials with Chan's formula.
    """
    if scale_in is not None:
        x = bn_act(x, scale_in, shift_in)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    y = y.contiguous(memory_format=torch.channels_last)
    acc = y.to(_acc_dtype(y.dtype))
    mean = acc.mean(dim=(0, 2, 3))
    m2 = (acc - _per_channel(mean)).square().sum(dim=(0, 2, 3))
    return y, mean, m2


def bn_finalize(
    mean: torch.Tensor,
    m2: torch.Tensor,
    count: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics -> ``(scale, shift, invstd)``; updates the running statistics in place.

    ``scale = weight * invstd``, ``shift = bias - mean * scale`` with ``invstd =
    1/sqrt(m2/count + eps)`` (biased variance, as BatchNorm normalises); the running variance
    takes the unbiased ``m2/(count-1)``, blended with ``momentum`` (already resolved by the
    caller, as ``nn.BatchNorm2d`` does for ``momentum=None``).
    """
    invstd = torch.rsqrt(m2 / count + eps)
    scale = invstd * weight.to(invstd.dtype) if weight is not None else invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = m2 / max(count - 1, 1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return scale, shift, invstd


def bn_add_act(
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    shortcut: Optional[torch.Tensor],
    shortcut_scale: Optional[torch.Tensor],
    shortcut_shift: Optional[torch.Tensor],
    shortcut_stride: int,
    relu: bool,
) -> torch.Tensor:
    """The block's last launch: ``act(y * scale + shift + shortcut_term)``, in ``y.dtype``.

    ``shortcut_term`` is the block input (identity), ``yd * sd + bd`` (projection: the raw
    projection conv output with its BN), or option A (see ``_shortcut_term``); none at all
    when ``shortcut`` is None (then this is the plain BN+ReLU).
    """
    acc = _acc_dtype(y.dtype)
    out = y.to(acc) * _per_channel(scale.to(acc)) + _per_channel(shift.to(acc))
    if shortcut is not None:
        out = out + _shortcut_term(shortcut, shortcut_scale, shortcut_shift, y.shape[1], shortcut_stride, acc)
    if relu:
        out = torch.relu(out)
    return out.to(y.dtype).contiguous(memory_format=torch.channels_last)


def _masked_grad(
    grad: torch.Tensor,
    y: torch.Tensor,
    act_out: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
    act_shift: Optional[torch.Tensor],
    acc: torch.dtype,
) -> torch.Tensor:
    """``grad`` through the ReLU that followed this BN: the mask comes from the saved output
    (``act_out > 0``), or is recomputed from ``y`` (``y * act_scale + act_shift > 0``), or
    there is no ReLU (both None)."""
    g = grad.to(acc)
    if act_out is not None:
        return torch.where(act_out > 0, g, torch.zeros_like(g))
    if act_scale is not None:
        pre = y.to(acc) * _per_channel(act_scale.to(acc)) + _per_channel(act_shift.to(acc))
        return torch.where(pre > 0, g, torch.zeros_like(g))
    return g


def bn_backward_reduce(
    grad: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    act_out: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
    act_shift: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(sum(g), sum(g * xhat))`` with ``g`` the gradient after the ReLU mask and
    ``xhat = (y - mean) * invstd``: BN backward's two reductions (= dbeta, dgamma)."""
    acc = _acc_dtype(y.dtype)
    g = _masked_grad(grad, y, act_out, act_scale, act_shift, acc)
    xhat = (y.to(acc) - _per_channel(mean.to(acc))) * _per_channel(invstd.to(acc))
    return g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))


def bn_backward_elemt(
    grad: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    sum_g: torch.Tensor,
    sum_g_xhat: torch.Tensor,
    count: int,
    act_out: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
    act_shift: Optional[torch.Tensor],
) -> torch.Tensor:
    """Gradient of train-mode BN's input: ``weight * invstd * (g - sum_g/count - xhat *
    sum_g_xhat/count)``, in ``y.dtype``, channels_last (``g``, ``xhat`` as in the reduce),
    computed as ``_bn_backward_apply`` of ``bn_backward_coef``."""
    acc = _acc_dtype(y.dtype)
    g = _masked_grad(grad, y, act_out, act_scale, act_shift, acc)
    coef = bn_backward_coef(mean.to(acc), invstd.to(acc), weight, sum_g, sum_g_xhat, count)
    return _bn_backward_apply(g, y, coef, acc).to(y.dtype).contiguous(memory_format=torch.channels_last)


def bn_backward_coef(
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    sum_g: torch.Tensor,
    sum_g_xhat: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """BN backward's per-channel constants, the rows ``(mean, grad_scale, mean_g, xhat_coef)`` of
    a (4, K) tensor in the accumulation dtype (``BnBackwardChannel`` in batchnorm.h):
    ``grad_scale = weight * invstd``, ``mean_g = sum_g / count``, ``xhat_coef = invstd *
    sum_g_xhat / count``. The prologue of the convs that consume ``dy`` reads them (see
    ``bn_grad_prologue``). K values: plain PyTorch, no launch of its own."""
    acc = _acc_dtype(invstd.dtype)
    invstd = invstd.to(acc)
    grad_scale = invstd if weight is None else invstd * weight.to(acc)
    return torch.stack([mean.to(acc), grad_scale, sum_g.to(acc) / count, invstd * sum_g_xhat.to(acc) / count])


def _bn_backward_apply(g: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``grad_scale * (g - mean_g - (y - mean) * xhat_coef)`` in ``acc`` (``bn_backward_elem``):
    both differences are taken before any product, so neither |mean| >> std nor a large
    ``mean_g`` cancels digits."""
    mean, grad_scale, mean_g, xhat_coef = (_per_channel(row) for row in coef.to(acc))
    return grad_scale * (g - mean_g - (y.to(acc) - mean) * xhat_coef)


# --- train mode backward: the conv's dgrad/wgrad with BN backward fused around them ---


def bn_grad_prologue(grad: torch.Tensor, grad_y: Optional[torch.Tensor], grad_coef: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient a backward conv consumes: ``grad`` as given, or with ``grad_coef`` (from
    ``bn_backward_coef``) this BN's backward ``grad_scale * (grad - mean_g - (grad_y - mean) *
    xhat_coef)``, computed in fp32 and rounded to ``grad.dtype`` (the kernels apply it to each
    tile as they load it)."""
    if grad_coef is None:
        return grad
    acc = _acc_dtype(grad.dtype)
    return _bn_backward_apply(grad.to(acc), grad_y, grad_coef, acc).to(grad.dtype)


def conv_bn_backward(
    grad: torch.Tensor,
    grad_y: Optional[torch.Tensor],
    grad_coef: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_in: Optional[torch.Tensor],
    shift_in: Optional[torch.Tensor],
    mean_in: Optional[torch.Tensor],
    invstd_in: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``conv_bn_stats``'s conv, with the BN backward of both neighbours fused in.

    ``dy = bn_grad_prologue(grad, grad_y, grad_coef)`` is the gradient of the conv output; the
    conv's input is ``x``, or ``relu(x*scale_in + shift_in)`` when ``scale_in``/``shift_in`` are
    given (the previous BN+ReLU, recomputed, never saved). Returns
    ``(grad_input, grad_weight, sum_g, sum_g_xhat)``:

    - ``grad_input`` (``output_mask[0]``): the dgrad. With ``scale_in`` it is the gradient of the
      previous BN's output *before* its ReLU, ``g = dgrad * (x*scale_in + shift_in > 0)``, and
      ``sum_g = sum(g)``, ``sum_g_xhat = sum(g * (x - mean_in) * invstd_in)`` over N, H, W
      (that BN's backward reductions, of ``g`` as stored) are returned too; else both are empty.
      ``x.dtype``, channels_last.
    - ``grad_weight`` (``output_mask[1]``): the wgrad, shape and dtype of ``weight``, contiguous.

    An output not asked for is an empty tensor. Accumulation is fp32 (fp64 for fp64 inputs).
    """
    dy = bn_grad_prologue(grad, grad_y, grad_coef)
    inp = x if scale_in is None else bn_act(x, scale_in, shift_in)
    grad_input, grad_weight = convolution_backward(dy, inp, weight, stride, padding, dilation, groups, output_mask)
    acc = _acc_dtype(x.dtype)
    empty = x.new_empty(0, dtype=acc)
    sum_g, sum_g_xhat = empty, empty
    if output_mask[0]:
        if scale_in is not None:
            pre = x.to(acc) * _per_channel(scale_in.to(acc)) + _per_channel(shift_in.to(acc))
            grad_input = torch.where(pre > 0, grad_input.to(acc), torch.zeros_like(pre)).to(x.dtype)
            g = grad_input.to(acc)
            xhat = (x.to(acc) - _per_channel(mean_in.to(acc))) * _per_channel(invstd_in.to(acc))
            sum_g, sum_g_xhat = g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))
        grad_input = grad_input.contiguous(memory_format=torch.channels_last)
    else:
        grad_input = x.new_empty(0)
    grad_weight = grad_weight.contiguous() if output_mask[1] else weight.new_empty(0)
    return grad_input, grad_weight, sum_g, sum_g_xhat
