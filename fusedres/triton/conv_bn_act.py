"""Fused ``act(conv(x, W) * scale + shift + residual)`` as one implicit-GEMM Triton kernel.

GEMM view (see ``csrc/include/fusedres/conv_geometry.h``, the same geometry the C++ kernels use):
M = N*P*Q output pixels, N = K/groups output channels, reduction Kd = R*S*Cg with C fastest,
which matches the KRSC (channels_last) weight layout. The input tile is gathered from the NHWC
input on the fly; the affine, residual add and ReLU run on the fp32 accumulator before the one
rounding to the output dtype. The residual is indexed in place from its own layout, so a block's
option-A shortcut (its strided input, zero-extended channels) needs no copy. The main loop,
``conv_tile``, is shared with the train-mode ``conv_bn_stats`` kernel, which adds a BN+ReLU
prologue on the loaded input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fusedres.triton._common import INTERPRET, conv_configs, conv_sizes, input_precision, round_to


@triton.jit
def conv_tile(
    x_ptr, w_ptr, scale_in_ptr, shift_in_ptr,
    offs_m, offs_n, grp,
    H, W, C, P, Q, M, KG, CG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The implicit-GEMM main loop shared by the conv kernels: for pixels ``offs_m`` and the
    group-local output channels ``offs_n`` of group ``grp``, returns (in ACC_DTYPE)

        acc[m, k] = sum_{r,s,c} a(n, h0 + r*dil_h, w0 + s*dil_w, g*CG + c) * W[g*KG + k, r, s, c]

    with m = (n, p, q), h0 = p*stride_h - pad_h, w0 = q*stride_w - pad_w, and a = x, or with
    HAS_PROLOGUE the previous layer's BN+ReLU ``relu(x * scale_in[c] + shift_in[c])`` computed
    in ACC_DTYPE and rounded to x's dtype (as ``_ref.bn_act`` stores it). Taps outside the input
    are zeros of ``a``: zero padding is applied after the prologue.

    All tensors are dense NHWC / KRSC. The reduction is one flat loop over (tap, channel block)
    pairs rather than nested tap/channel loops, so the compiler pipelines it across taps even
    when one tap holds a single channel block (3x3 convs with Cg <= 64).
    """
    m_mask = offs_m < M
    n_mask = offs_n < KG
    offs_k = tl.arange(0, BLOCK_K)

    q = offs_m % Q
    t = offs_m // Q
    p = t % P
    n = t // P
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    # Pointer to x[n, h0, w0, g*CG]; may point into the padding, every load is masked.
    x_rows = x_ptr + ((n * H + h0) * W + w0) * C + grp * CG
    # Pointer to W[g*KG + k, 0, 0, 0] (KRSC, one filter = R*S*CG elements).
    w_cols = w_ptr + (grp * KG + offs_n) * (R * S * CG)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    c_blocks = tl.cdiv(CG, BLOCK_K)
    for it in range(0, R * S * c_blocks):
        tap = it // c_blocks
        c0 = (it - tap * c_blocks) * BLOCK_K
        r = tap // S
        s = tap - r * S
        h = h0 + r * dil_h
        w = w0 + s * dil_w
        a_row_mask = m_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        c = c0 + offs_k
        c_mask = c < CG
        a_mask = a_row_mask[:, None] & c_mask[None, :]

        a_ptrs = x_rows[:, None] + ((r * dil_h * W + s * dil_w) * C + c)[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if HAS_PROLOGUE:
            scale_in = tl.load(scale_in_ptr + grp * CG + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
            shift_in = tl.load(shift_in_ptr + grp * CG + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
            v = a.to(ACC_DTYPE) * scale_in[None, :] + shift_in[None, :]
            # NaN-propagating ReLU; then padding taps become 0, not relu(shift_in).
            v = tl.where(v < 0, 0.0, v)
            v = tl.where(a_mask, v, 0.0)
            a = round_to(v, x_ptr.dtype.element_ty, INTERPRET)
        b_ptrs = w_cols[None, :] + (tap * CG + c)[:, None]
        b = tl.load(b_ptrs, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        if INTERPRET:
            # The interpreter's dot multiplies bf16 bit patterns as integers; fp32 is exact.
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(
    configs=conv_configs(),
    key=["M", "KG", "CG", "R", "S", "stride_h", "stride_w", "dil_h", "dil_w"],
)
@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    H, W, C, P, Q, M, K, KG, CG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    RES_C, RES_H, RES_W, RES_STRIDE,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M pixels) x (BLOCK_N channels) tile of one group of

        out[m, k] = act( conv(x, W)[m, k] * scale[k] + shift[k] + res[m, k] )
        res[m, k] = residual[n, p*RES_STRIDE, q*RES_STRIDE, k]   if k < RES_C, m = (n, p, q)
                  = 0                                            otherwise

    with the conv as in ``conv_tile`` (taps outside the input read as zero: they are zeros of
    the input, so other=0 is exact) and act = ReLU (NaN-propagating) or identity. All tensors
    are dense NHWC / KRSC / NPQK; the residual is (N, RES_H, RES_W, RES_C), which with stride 1
    and RES_C = K is the output's own layout.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    grp = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = conv_tile(
        x_ptr, w_ptr, x_ptr, x_ptr,
        offs_m, offs_n, grp,
        H, W, C, P, Q, M, KG, CG,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        R, S, False, INPUT_PRECISION, ACC_DTYPE, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K,
    )

    m_mask = offs_m < M
    n_mask = offs_n < KG
    k_glob = grp * KG + offs_n
    y = acc
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + k_glob, mask=n_mask, other=1.0)[None, :]
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + k_glob, mask=n_mask, other=0.0)[None, :]
    out_offs = offs_m[:, None] * K + k_glob[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        q = offs_m % Q
        t = offs_m // Q
        p = t % P
        n = t // P
        res_rows = ((n * RES_H + p * RES_STRIDE) * RES_W + q * RES_STRIDE) * RES_C
        # Channels k >= RES_C load as 0 and so add nothing: the zero-extension of option A.
        res_mask = m_mask[:, None] & (n_mask & (k_glob < RES_C))[None, :]
        y = y + tl.load(res_ptr + res_rows[:, None] + k_glob[None, :], mask=res_mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        # Not tl.maximum: torch.relu keeps NaN, and max(NaN, 0) may return 0 on the GPU.
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + out_offs, round_to(y, out_ptr.dtype.element_ty, INTERPRET), mask=out_mask)


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
    """``act(conv2d(x, weight) * scale + shift + residual)`` in one launch (``_ref.conv_bn_act``).

    ``x`` (N, C, H, W) and ``weight`` (K, C/groups, R, S) share a floating dtype; ``scale`` and
    ``shift`` are (K,) or None (1 / 0), applied in fp32 (fp64 for fp64 inputs); ``residual`` is
    None, (N, K, P, Q), or (N, Cr, Hr, Wr) with Cr <= K read at ``[n, k, p*residual_stride,
    q*residual_stride]`` (option A). Returns (N, K, P, Q) in ``x.dtype`` and ``torch.channels_last``.
    Inputs in another memory format are copied to channels_last first (a no-op for the intended
    channels_last inputs). Operands are validated by ``fusedres.ops`` before they get here.
    """
    (N, C, H, W, K, CG, KG, R, S, P, Q,
     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w) = conv_sizes(x, weight, stride, padding, dilation, groups)

    cl = torch.channels_last
    out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device, memory_format=cl)
    M = N * P * Q
    if M == 0:
        return out

    x = x.contiguous(memory_format=cl)
    weight = weight.contiguous(memory_format=cl)
    # Absent operands get a dummy pointer; the constexpr flags compile their loads away.
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    scale_arg = scale.to(acc_dtype).contiguous() if scale is not None else out
    shift_arg = shift.to(acc_dtype).contiguous() if shift is not None else out
    res_arg = residual.contiguous(memory_format=cl) if residual is not None else out
    _, res_c, res_h, res_w = res_arg.shape

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(KG, meta["BLOCK_N"]), groups)

    _conv_bn_act_kernel[grid](
        x, weight, scale_arg, shift_arg, res_arg, out,
        H, W, C, P, Q, M, K, KG, CG,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        res_c, res_h, res_w, int(residual_stride),
        R=R,
        S=S,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        HAS_RESIDUAL=residual is not None,
        RELU=bool(relu),
        INPUT_PRECISION=input_precision(x.dtype),
        ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        INTERPRET=INTERPRET,
    )
    return out
