"""A residual block's last launch, ``out = act(y * scale + shift + shortcut_term)``, as one
elementwise pass over the NPQK view of channels_last tensors (rows = N*P*Q, K contiguous).

The shortcut is read in place from its own (N, Cs, Hs, Ws) layout: identity, a projection with
its BatchNorm folded into the same pass, or the paper's option A (strided, zero-extended
channels); nothing is materialised.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusedres.triton._common import INTERPRET, elementwise_tile, round_to, rows_by_channels_tile


@triton.jit
def _bn_add_act_kernel(
    y_ptr, scale_ptr, shift_ptr, sc_ptr, sc_scale_ptr, sc_shift_ptr, out_ptr,
    ROWS, K, P, Q, CS, HS, WS, SC_STRIDE,
    HAS_SHORTCUT: tl.constexpr,
    HAS_SC_SCALE: tl.constexpr,
    HAS_SC_SHIFT: tl.constexpr,
    RELU: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For rows i = (n, p, q) and channels k of the tile, in ACC_DTYPE:

        out[i, k] = act( y[i, k] * scale[k] + shift[k] + s[i, k] )
        s[i, k]   = sc[n, p*SC_STRIDE, q*SC_STRIDE, k] * sc_scale[k] + sc_shift[k]   if k < CS
                  = 0                                                               otherwise

    (sc_scale = 1, sc_shift = 0 if absent; s = 0 without a shortcut), rounded once to out's
    dtype; act = ReLU (NaN-propagating) or identity. ``sc`` is dense NHWC of shape (N, HS, WS, CS).
    """
    pid_r, offs_r, offs_k, k_mask, mask, offs = rows_by_channels_tile(ROWS, K, BLOCK_R, BLOCK_K)

    scale = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + offs_k, mask=k_mask, other=0.0).to(ACC_DTYPE)
    out = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) * scale[None, :] + shift[None, :]
    if HAS_SHORTCUT:
        q = offs_r % Q
        t = offs_r // Q
        p = t % P
        n = t // P
        sc_rows = ((n * HS + p * SC_STRIDE) * WS + q * SC_STRIDE) * CS
        sc_k_mask = offs_k < CS
        # Channels k >= CS load as 0 and so add nothing: the zero-extension of option A.
        sc_mask = mask & sc_k_mask[None, :]  # CS <= K, so within the tile's mask
        s = tl.load(sc_ptr + sc_rows[:, None] + offs_k[None, :], mask=sc_mask, other=0.0).to(ACC_DTYPE)
        if HAS_SC_SCALE:
            s = s * tl.load(sc_scale_ptr + offs_k, mask=sc_k_mask, other=0.0).to(ACC_DTYPE)[None, :]
        if HAS_SC_SHIFT:
            s = s + tl.load(sc_shift_ptr + offs_k, mask=sc_k_mask, other=0.0).to(ACC_DTYPE)[None, :]
        out = out + s
    if RELU:
        # Not tl.maximum: torch.relu keeps NaN, and max(NaN, 0) may return 0 on the GPU.
        out = tl.where(out < 0, 0.0, out)
    tl.store(out_ptr + offs, round_to(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


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
    """``act(y * scale + shift + shortcut_term)`` in ``y.dtype``, channels_last; see
    ``_ref.bn_add_act``.

    ``y`` is (N, K, P, Q); ``scale``, ``shift`` are (K,); ``shortcut`` is None or (N, Cs, Hs, Ws)
    with Cs <= K, read at ``[n, k, p*shortcut_stride, q*shortcut_stride]``; ``shortcut_scale``
    / ``shortcut_shift`` are (Cs,) or None. The affine runs in fp32 (fp64 for fp64 inputs).
    Inputs in another memory format are copied to channels_last first (a no-op for
    channels_last inputs). Operands are validated by ``fusedres.ops``.
    """
    N, K, P, Q = y.shape
    rows = N * P * Q
    cl = torch.channels_last
    out = torch.empty((N, K, P, Q), dtype=y.dtype, device=y.device, memory_format=cl)
    if rows == 0 or K == 0:
        return out

    acc_dtype = torch.promote_types(y.dtype, torch.float32)
    y = y.contiguous(memory_format=cl)
    # Absent operands get a dummy pointer; the constexpr flags compile their loads away.
    sc = shortcut.contiguous(memory_format=cl) if shortcut is not None else y
    sc_scale = shortcut_scale.contiguous() if shortcut_scale is not None else y
    sc_shift = shortcut_shift.contiguous() if shortcut_shift is not None else y
    _, cs, hs, ws = sc.shape

    block_r, block_k, num_warps = elementwise_tile(K)
    _bn_add_act_kernel[(triton.cdiv(rows, block_r), triton.cdiv(K, block_k))](
        y, scale.contiguous(), shift.contiguous(), sc, sc_scale, sc_shift, out,
        rows, K, P, Q, cs, hs, ws, int(shortcut_stride),
        HAS_SHORTCUT=shortcut is not None,
        HAS_SC_SCALE=shortcut_scale is not None,
        HAS_SC_SHIFT=shortcut_shift is not None,
        RELU=bool(relu),
        ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        INTERPRET=INTERPRET,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out
