"""Train-mode BatchNorm(+ReLU) backward as two elementwise passes over the NPQK view of
channels_last tensors (rows = N*P*Q, K contiguous).

``bn_backward_reduce`` writes per-channel partial sums of ``g`` and ``g * xhat`` for each row
block into ``[num_row_blocks, K]`` buffers, finished by a ``sum(0)`` (deterministic, no
atomics); ``bn_backward_elemt`` turns them into the input gradient. ``g`` is the incoming
gradient through the ReLU that followed the BN, whose mask comes from the saved block output
or is recomputed from the raw conv output ``y``; the normalised activation is never stored.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusedres.triton._common import INTERPRET, elementwise_tile, round_to, rows_by_channels_tile


@triton.jit
def _masked_grad(
    grad_ptr, y, act_out_ptr, act_scale_ptr, act_shift_ptr, offs, offs_k, mask, k_mask,
    MASK_FROM_OUT: tl.constexpr,
    MASK_FROM_Y: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``g = grad`` where the ReLU passed, else 0, in ACC_DTYPE. The ReLU passed where
    ``act_out > 0`` (MASK_FROM_OUT), or ``y * act_scale + act_shift > 0`` (MASK_FROM_Y), or
    everywhere (no ReLU). Like ``torch.where(pre > 0, g, 0)``: a NaN in the mask's input gives
    0, a NaN in ``grad`` survives."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if MASK_FROM_OUT:
        act = tl.load(act_out_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        g = tl.where(act > 0, g, 0.0)
    elif MASK_FROM_Y:
        a = tl.load(act_scale_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
        b = tl.load(act_shift_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
        pre = y * a[None, :] + b[None, :]
        g = tl.where(pre > 0, g, 0.0)
    return g


@triton.jit
def _bn_backward_reduce_kernel(
    grad_ptr, y_ptr, mean_ptr, invstd_ptr, act_out_ptr, act_scale_ptr, act_shift_ptr,
    part_g_ptr, part_gx_ptr,
    ROWS, K,
    MASK_FROM_OUT: tl.constexpr,
    MASK_FROM_Y: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For the tile rows i, channels k, in ACC_DTYPE (fp32; fp64 for fp64 inputs):

        xhat[i, k] = (y[i, k] - mean[k]) * invstd[k]
        part_g[pid_r, k]  = sum_i g[i, k]
        part_gx[pid_r, k] = sum_i g[i, k] * xhat[i, k]

    with ``g`` from ``_masked_grad``; masked-out elements have g = 0 and add nothing.
    """
    pid_r, offs_r, offs_k, k_mask, mask, offs = rows_by_channels_tile(ROWS, K, BLOCK_R, BLOCK_K)

    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    g = _masked_grad(grad_ptr, y, act_out_ptr, act_scale_ptr, act_shift_ptr, offs, offs_k, mask, k_mask,
                     MASK_FROM_OUT, MASK_FROM_Y, ACC_DTYPE)
    mean = tl.load(mean_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
    xhat = (y - mean[None, :]) * invstd[None, :]
    tl.store(part_g_ptr + pid_r * K + offs_k, tl.sum(g, axis=0), mask=k_mask)
    tl.store(part_gx_ptr + pid_r * K + offs_k, tl.sum(g * xhat, axis=0), mask=k_mask)


@triton.jit
def _bn_backward_elemt_kernel(
    grad_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, sum_g_ptr, sum_gx_ptr,
    act_out_ptr, act_scale_ptr, act_shift_ptr, dy_ptr,
    ROWS, K, count,
    HAS_WEIGHT: tl.constexpr,
    MASK_FROM_OUT: tl.constexpr,
    MASK_FROM_Y: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For the tile rows i, channels k, in ACC_DTYPE, rounded once to dy's dtype:

        dy[i, k] = weight[k] * invstd[k] * (g[i, k] - sum_g[k]/count - xhat[i, k] * sum_gx[k]/count)

    with ``g`` from ``_masked_grad``, ``xhat`` as in the reduce, and weight = 1 if absent.
    """
    pid_r, offs_r, offs_k, k_mask, mask, offs = rows_by_channels_tile(ROWS, K, BLOCK_R, BLOCK_K)

    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    g = _masked_grad(grad_ptr, y, act_out_ptr, act_scale_ptr, act_shift_ptr, offs, offs_k, mask, k_mask,
                     MASK_FROM_OUT, MASK_FROM_Y, ACC_DTYPE)
    n = tl.cast(count, ACC_DTYPE)
    mean = tl.load(mean_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
    mean_g = tl.load(sum_g_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE) / n
    mean_gx = tl.load(sum_gx_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE) / n
    coef = invstd
    if HAS_WEIGHT:
        coef = coef * tl.load(weight_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
    xhat = (y - mean[None, :]) * invstd[None, :]
    dy = coef[None, :] * (g - mean_g[None, :] - xhat * mean_gx[None, :])
    tl.store(dy_ptr + offs, round_to(dy, dy_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _prepare(grad, y, act_out, act_scale, act_shift):
    """channels_last copies (no-ops for channels_last inputs), the dummy pointer for absent
    operands (the constexpr flags compile their loads away) and the mask flags."""
    cl = torch.channels_last
    grad = grad.contiguous(memory_format=cl)
    y = y.contiguous(memory_format=cl)
    from_out = act_out is not None
    from_y = not from_out and act_scale is not None
    masks = (
        act_out.contiguous(memory_format=cl) if from_out else y,
        act_scale.contiguous() if from_y else y,
        act_shift.contiguous() if from_y else y,
    )
    return grad, y, masks, dict(MASK_FROM_OUT=from_out, MASK_FROM_Y=from_y)


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    acc = torch.promote_types(dtype, torch.float32)
    return acc, tl.float64 if acc == torch.float64 else tl.float32


def bn_backward_reduce(
    grad: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    act_out: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
    act_shift: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(sum(g), sum(g * xhat))`` over N, P, Q in fp32 (fp64 for fp64 ``y``); see
    ``_ref.bn_backward_reduce``.

    ``grad``, ``y`` and ``act_out`` (or None) are (N, K, P, Q); ``mean``, ``invstd``,
    ``act_scale``, ``act_shift`` (or None) are (K,). Operands are validated by ``fusedres.ops``.
    """
    N, K, P, Q = y.shape
    rows = N * P * Q
    acc, tl_acc = _acc(y.dtype)
    if rows == 0 or K == 0:
        zeros = torch.zeros(K, dtype=acc, device=y.device)
        return zeros, zeros.clone()

    grad, y, masks, flags = _prepare(grad, y, act_out, act_scale, act_shift)
    block_r, block_k, num_warps = elementwise_tile(K)
    row_blocks = triton.cdiv(rows, block_r)
    part_g = torch.empty((row_blocks, K), dtype=acc, device=y.device)
    part_gx = torch.empty_like(part_g)
    _bn_backward_reduce_kernel[(row_blocks, triton.cdiv(K, block_k))](
        grad, y, mean.contiguous(), invstd.contiguous(), *masks,
        part_g, part_gx,
        rows, K,
        **flags,
        ACC_DTYPE=tl_acc,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return part_g.sum(0), part_gx.sum(0)


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
    """The gradient of train-mode BN's input, ``weight * invstd * (g - sum_g/count - xhat *
    sum_g_xhat/count)``, as (N, K, P, Q) in ``y.dtype``, channels_last; see
    ``_ref.bn_backward_elemt``. Operands as in ``bn_backward_reduce``, plus ``weight`` (K,) or
    None and the two sums from it. Operands are validated by ``fusedres.ops``.
    """
    N, K, P, Q = y.shape
    rows = N * P * Q
    dy = torch.empty((N, K, P, Q), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    if rows == 0 or K == 0:
        return dy

    _, tl_acc = _acc(y.dtype)
    grad, y, masks, flags = _prepare(grad, y, act_out, act_scale, act_shift)
    weight_arg = weight.contiguous() if weight is not None else y
    block_r, block_k, num_warps = elementwise_tile(K)
    _bn_backward_elemt_kernel[(triton.cdiv(rows, block_r), triton.cdiv(K, block_k))](
        grad, y, mean.contiguous(), invstd.contiguous(), weight_arg,
        sum_g.contiguous(), sum_g_xhat.contiguous(), *masks, dy,
        rows, K, int(count),
        HAS_WEIGHT=weight is not None,
        **flags,
        ACC_DTYPE=tl_acc,
        INTERPRET=INTERPRET,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return dy
