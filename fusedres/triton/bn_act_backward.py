"""Backward of the conv epilogue ``act(conv(x, weight) * scale + shift + residual)`` in one pass.

Works on the NPQK view of channels_last tensors: rows = N*P*Q, K contiguous. Each program
handles one (BLOCK_R rows) x (BLOCK_K channels) tile, writes its part of ``grad_conv`` and its
per-channel partial sums into row ``pid_r`` of a ``[num_row_blocks, K]`` fp32 buffer; a
``sum(0)`` over that buffer finishes the reduction deterministically (no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusedres.triton._common import INTERPRET, elementwise_tile, round_to, rows_by_channels_tile


@triton.jit
def _bn_act_backward_kernel(
    grad_out_ptr, out_ptr, scale_ptr,
    grad_conv_ptr, part_shift_ptr,
    ROWS, K,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For the tile rows i, channels k:

        g[i, k]         = grad_out[i, k] if (not RELU or out[i, k] > 0) else 0
        grad_conv[i, k] = g[i, k] * scale[k]                       (rounded to grad_out's dtype)
        part_shift[pid_r, k] = sum_i g[i, k]                       (fp32)

    All arithmetic is in ACC_DTYPE (fp32; fp64 for fp64 inputs); masked-out elements load as 0 and so add nothing to the sums.
    """
    pid_r, offs_r, offs_k, k_mask, mask, offs = rows_by_channels_tile(ROWS, K, BLOCK_R, BLOCK_K)

    g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        # Same as torch.where(out > 0, g, 0): a NaN in out gives 0, a NaN in grad_out survives.
        g = tl.where(o > 0, g, 0.0)
    tl.store(part_shift_ptr + pid_r * K + offs_k, tl.sum(g, axis=0), mask=k_mask)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)[None, :]
    g = round_to(g, grad_conv_ptr.dtype.element_ty, INTERPRET)
    tl.store(grad_conv_ptr + offs, g, mask=mask)


def bn_act_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    scale: Optional[torch.Tensor],
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_conv, grad_shift)`` of the epilogue; see ``_ref.bn_act_backward``.

    ``grad_out`` and ``out`` are (N, K, P, Q); ``scale`` is (K,) or None. ``grad_conv`` has
    ``grad_out``'s dtype in channels_last; ``grad_shift`` is fp32 (fp64 for fp64 inputs) of
    shape (K,). Inputs in another memory format are copied to channels_last first (a no-op for
    channels_last inputs). Operands are validated by ``fusedres.ops`` before they get here.
    """
    shape = tuple(grad_out.shape)
    N, K, P, Q = shape
    rows = N * P * Q
    dev = grad_out.device
    cl = torch.channels_last
    acc_dtype = torch.promote_types(grad_out.dtype, torch.float32)

    grad_conv = torch.empty(shape, dtype=grad_out.dtype, device=dev, memory_format=cl)
    if rows == 0 or K == 0:
        return grad_conv, torch.zeros(K, dtype=acc_dtype, device=dev)

    grad_out = grad_out.contiguous(memory_format=cl)
    out_arg = out.contiguous(memory_format=cl) if relu else grad_out
    scale_arg = scale.to(acc_dtype).contiguous() if scale is not None else grad_out

    block_r, block_k, num_warps = elementwise_tile(K)
    row_blocks = triton.cdiv(rows, block_r)
    part_shift = torch.empty((row_blocks, K), dtype=acc_dtype, device=dev)

    _bn_act_backward_kernel[(row_blocks, triton.cdiv(K, block_k))](
        grad_out, out_arg, scale_arg,
        grad_conv, part_shift,
        rows, K,
        HAS_SCALE=scale is not None,
        RELU=bool(relu),
        ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        INTERPRET=INTERPRET,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return grad_conv, part_shift.sum(0)
