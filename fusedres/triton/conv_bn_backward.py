"""Train-mode conv backward with BatchNorm backward fused around it: the dgrad and wgrad
implicit GEMMs of ``conv(relu(x * scale_in + shift_in), W)``.

Both GEMMs read the gradient of the conv output through a prologue, this layer's BN backward
``dy = grad_scale * (grad - mean_g - (grad_y - mean) * xhat_coef)`` (per-channel constants from
``_ref.bn_backward_coef``), so ``dy`` is never written.

- dgrad: M = N*H*W input pixels, N = C/groups input channels, reduction over (tap, k). With
  stride > 1 the pixels are split into stride_h*stride_w phases (h % stride_h, w % stride_w);
  all pixels of a phase share their valid taps (those with ``(h + pad - r*dil) % stride == 0``),
  so each program loops over its phase's taps only, read from a small host-built table, and no
  MMA is spent on taps that are zero for the whole tile. The epilogue applies the previous
  ReLU's mask and writes per-tile partial sums of that BN's backward reductions into a
  ``[tiles, C]`` buffer, merged by a second kernel in a fixed order (deterministic, no atomics).
- wgrad: M = K/groups output channels, N = C/groups channels of one tap (KRSC order), reduction
  over the N*P*Q output pixels, split in fixed chunks across programs (split-K). Each split
  writes its partial to its own slice of a workspace; a ``sum`` over the splits finishes it
  (deterministic, no atomics). The input goes through the previous BN+ReLU as it is loaded.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fusedres.triton._common import INTERPRET, conv_configs, conv_sizes, input_precision, round_to

_CONFIGS = conv_configs()


@triton.jit
def _dy_tile(
    grad_ptr, grad_y_ptr, coef_ptr, offs, k, k_mask, mask, K,
    HAS_COEF: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """The conv output's gradient at element offsets ``offs`` of the NPQK tensors (channels
    ``k``, shaped to broadcast against ``offs``): ``grad``, or with HAS_COEF this BN's backward
    ``grad_scale[k] * (grad - mean_g[k] - (grad_y - mean[k]) * xhat_coef[k])`` in ACC_DTYPE,
    rounded to grad's dtype (as ``_ref.bn_grad_prologue`` stores it). Masked elements are 0:
    they lie outside the output, where -grad_scale * mean_g must not leak in."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    if HAS_COEF:
        mean = tl.load(coef_ptr + k, mask=k_mask, other=0.0)
        grad_scale = tl.load(coef_ptr + K + k, mask=k_mask, other=0.0)
        mean_g = tl.load(coef_ptr + 2 * K + k, mask=k_mask, other=0.0)
        xhat_coef = tl.load(coef_ptr + 3 * K + k, mask=k_mask, other=0.0)
        gy = tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        v = grad_scale * (g.to(ACC_DTYPE) - mean_g - (gy - mean) * xhat_coef)
        g = round_to(tl.where(mask, v, 0.0), grad_ptr.dtype.element_ty, INTERPRET)
    return g


@triton.autotune(
    configs=_CONFIGS,
    key=["M0", "KG", "CG", "R", "S", "stride_h", "stride_w", "dil_h", "dil_w"],
)
@triton.jit
def _dgrad_kernel(
    grad_ptr, grad_y_ptr, coef_ptr, w_ptr, x_ptr, scale_in_ptr, shift_in_ptr, mean_in_ptr, invstd_in_ptr,
    gi_ptr, part_g_ptr, part_gx_ptr, tap_count_ptr, tap_table_ptr,
    NB, H, W, C, P, Q, K, KG, CG, M0, GROUPS,
    stride_h, stride_w, dil_h, dil_w,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M pixels of one phase) x (BLOCK_N input channels) tile of one group of

        dgrad[n, h, w, c] = sum_{r,s,k} dy[n, p, q, g*KG + k] * W[g*KG + k, r, s, c],
        p = (h + pad_h - r*dil_h) / stride_h,  q = (w + pad_w - s*dil_w) / stride_w,

    over the taps where both divisions are exact and (p, q) lies in the output. The phase
    (ph, pw) = (h % stride_h, w % stride_w) decides the taps: its table row lists them with
    (dp, dq) such that p = i + dp, q = j + dq for the pixel h = ph + i*stride_h, w = pw +
    j*stride_w. With HAS_PROLOGUE (in ACC_DTYPE, of g as stored in gi's dtype):

        g = dgrad * (x*scale_in + shift_in > 0)
        part_g[row, c]  = sum_tile g,   part_gx[row, c] = sum_tile g * (x - mean_in) * invstd_in

    with row = phase * tiles_per_phase + pid_m. M0 = N*ceil(H/stride_h)*ceil(W/stride_w) is the
    pixel count of phase 0, the largest; tiles past a smaller phase's end write zero partials.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2).to(tl.int64)
    phase = pid_z // GROUPS
    grp = pid_z - phase * GROUPS
    ph = phase // stride_w
    pw = phase - ph * stride_w
    # Rows and columns of this phase; clamped to 1 as divisors (an empty phase, H < stride,
    # is all masked by m_mask but must not divide by zero).
    hp = (H - ph + stride_h - 1) // stride_h
    wp = (W - pw + stride_w - 1) // stride_w
    m_phase = NB * hp * wp
    hp = tl.maximum(hp, 1)
    wp = tl.maximum(wp, 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < m_phase
    n_mask = offs_n < CG
    j = offs_m % wp
    t = offs_m // wp
    i = t % hp
    n = t // hp
    # Offset of dy[n, i, j, g*KG], before the tap's (dp, dq) shift; every load is masked.
    dy_rows = ((n * P + i) * Q + j) * K + grp * KG
    # Pointer to W[g*KG, 0, 0, offs_n] (KRSC, channels within the group).
    w_cols = w_ptr + grp * KG * (R * S * CG) + offs_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    k_blocks = tl.cdiv(KG, BLOCK_K)
    n_taps = tl.load(tap_count_ptr + phase)
    # One flat loop over (valid tap, k block) pairs, as in conv_tile, so it pipelines across taps.
    for it in range(0, n_taps * k_blocks):
        slot = it // k_blocks
        k0 = (it - slot * k_blocks) * BLOCK_K
        entry = tap_table_ptr + (phase * (R * S) + slot) * 3
        tap = tl.load(entry)
        dp = tl.load(entry + 1)
        dq = tl.load(entry + 2)
        p = i + dp
        q = j + dq
        row_mask = m_mask & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
        k = k0 + offs_k
        k_mask = k < KG
        a_mask = row_mask[:, None] & k_mask[None, :]
        a_offs = (dy_rows + (dp * Q + dq) * K)[:, None] + k[None, :]
        a = _dy_tile(grad_ptr, grad_y_ptr, coef_ptr, a_offs, (grp * KG + k)[None, :], k_mask[None, :], a_mask, K,
                     HAS_COEF, ACC_DTYPE, INTERPRET)
        b_ptrs = w_cols[None, :] + (k * (R * S * CG) + tap * CG)[:, None]
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if INTERPRET:
            # The interpreter's dot multiplies bf16 bit patterns as integers; fp32 is exact.
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    h = ph + i * stride_h
    w = pw + j * stride_w
    c_glob = grp * CG + offs_n
    out_offs = (((n * H + h) * W + w) * C)[:, None] + c_glob[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_PROLOGUE:
        xv = tl.load(x_ptr + out_offs, mask=out_mask, other=0.0).to(ACC_DTYPE)
        scale_in = tl.load(scale_in_ptr + c_glob, mask=n_mask, other=0.0)
        shift_in = tl.load(shift_in_ptr + c_glob, mask=n_mask, other=0.0)
        # The previous ReLU passed where its input was > 0 (a NaN input blocks, as torch.where).
        acc = tl.where(xv * scale_in[None, :] + shift_in[None, :] > 0, acc, 0.0)
    gi = round_to(acc, gi_ptr.dtype.element_ty, INTERPRET)
    tl.store(gi_ptr + out_offs, gi, mask=out_mask)

    if HAS_PROLOGUE:
        g = tl.where(out_mask, gi.to(ACC_DTYPE), 0.0)
        mean_in = tl.load(mean_in_ptr + c_glob, mask=n_mask, other=0.0)
        invstd_in = tl.load(invstd_in_ptr + c_glob, mask=n_mask, other=0.0)
        xhat = (xv - mean_in[None, :]) * invstd_in[None, :]
        row = phase * tl.num_programs(0) + pid_m
        tl.store(part_g_ptr + row * C + c_glob, tl.sum(g, axis=0), mask=n_mask)
        tl.store(part_gx_ptr + row * C + c_glob, tl.sum(g * xhat, axis=0), mask=n_mask)


@triton.jit
def _sum_partials_kernel(
    part_g_ptr, part_gx_ptr, sum_g_ptr, sum_gx_ptr,
    TILES, C,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``sum_g[c] = sum_t part_g[t, c]`` and ``sum_gx[c] = sum_t part_gx[t, c]`` over the TILES
    rows, BLOCK_T at a time in a fixed order: the same result on every run."""
    pid = tl.program_id(0).to(tl.int64)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    sum_g = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    sum_gx = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = (t < TILES)[:, None] & c_mask[None, :]
        offs = t[:, None] * C + offs_c[None, :]
        sum_g += tl.sum(tl.load(part_g_ptr + offs, mask=mask, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(part_gx_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(sum_g_ptr + offs_c, sum_g, mask=c_mask)
    tl.store(sum_gx_ptr + offs_c, sum_gx, mask=c_mask)


@triton.autotune(
    configs=_CONFIGS,
    key=["KG", "CG", "R", "S", "L", "L_CHUNK", "stride_h", "stride_w", "dil_h", "dil_w"],
)
@triton.jit
def _wgrad_kernel(
    grad_ptr, grad_y_ptr, coef_ptr, x_ptr, scale_in_ptr, shift_in_ptr, ws_ptr,
    H, W, C, P, Q, K, KG, CG, L, L_CHUNK, GROUPS,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M output channels) x (BLOCK_N input channels of one tap (r, s)) tile of one
    group, over split ``sp``'s chunk of the L = N*P*Q output pixels l = (n, p, q):

        ws[sp, g*KG + k, r, s, c] = sum_{l in [sp*L_CHUNK, (sp+1)*L_CHUNK)} dy[l, g*KG + k]
                                      * a(n, p*stride_h - pad_h + r*dil_h, q*stride_w - pad_w + s*dil_w, g*CG + c)

    with dy from ``_dy_tile`` and a = x, or with HAS_PROLOGUE ``relu(x*scale_in + shift_in)``
    rounded to x's dtype; taps outside the input are zeros of a (padding after the prologue).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2).to(tl.int64)
    sp = pid_z // GROUPS
    grp = pid_z - sp * GROUPS
    c_blocks = tl.cdiv(CG, BLOCK_N)
    tap = pid_n // c_blocks
    r = tap // S
    s = tap - r * S

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n - tap * c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_K)
    m_mask = offs_m < KG
    n_mask = offs_n < CG
    k_glob = grp * KG + offs_m
    c_glob = grp * CG + offs_n
    if HAS_PROLOGUE:
        scale_in = tl.load(scale_in_ptr + c_glob, mask=n_mask, other=0.0)
        shift_in = tl.load(shift_in_ptr + c_glob, mask=n_mask, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    l_start = sp * L_CHUNK
    l_end = tl.minimum(l_start + L_CHUNK, L)
    for l0 in range(l_start, l_end, BLOCK_K):
        pix = l0 + offs_l
        l_mask = pix < l_end
        q = pix % Q
        t = pix // Q
        p = t % P
        n = t // P
        # dy^T tile (channels x pixels): loaded transposed, K is the contiguous dim of NPQK.
        dy_mask = m_mask[:, None] & l_mask[None, :]
        a = _dy_tile(grad_ptr, grad_y_ptr, coef_ptr, k_glob[:, None] + (pix * K)[None, :], k_glob[:, None],
                     m_mask[:, None], dy_mask, K, HAS_COEF, ACC_DTYPE, INTERPRET)

        h = p * stride_h - pad_h + r * dil_h
        w = q * stride_w - pad_w + s * dil_w
        x_mask = (l_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W))[:, None] & n_mask[None, :]
        b = tl.load(x_ptr + (((n * H + h) * W + w) * C)[:, None] + c_glob[None, :], mask=x_mask, other=0.0)
        if HAS_PROLOGUE:
            v = b.to(ACC_DTYPE) * scale_in[None, :] + shift_in[None, :]
            # NaN-propagating ReLU; then padding taps become 0, not relu(shift_in).
            v = tl.where(v < 0, 0.0, v)
            b = round_to(tl.where(x_mask, v, 0.0), x_ptr.dtype.element_ty, INTERPRET)
        if INTERPRET:
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    ws_offs = (((sp * K + k_glob) * (R * S) + tap) * CG)[:, None] + offs_n[None, :]
    tl.store(ws_ptr + ws_offs, acc, mask=m_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=64)
def _phase_taps(R: int, S: int, stride: tuple, padding: tuple, dilation: tuple, device: torch.device):
    """Per phase (ph, pw) of the dgrad pixels, its valid taps as rows (r*S + s, dp, dq), where a
    pixel h = ph + i*stride_h reads output row p = i + dp (and likewise for w): ``(count[phases],
    table[phases, R*S, 3])``, int32. Cached: a few hundred bytes per conv shape, built and copied
    to the device once."""
    (sh, sw), (pad_h, pad_w), (dil_h, dil_w) = stride, padding, dilation
    count = torch.zeros(sh * sw, dtype=torch.int32)
    table = torch.zeros((sh * sw, R * S, 3), dtype=torch.int32)
    for ph in range(sh):
        for pw in range(sw):
            rows = [
                (r * S + s, (ph + pad_h - r * dil_h) // sh, (pw + pad_w - s * dil_w) // sw)
                for r in range(R)
                if (ph + pad_h - r * dil_h) % sh == 0
                for s in range(S)
                if (pw + pad_w - s * dil_w) % sw == 0
            ]
            count[ph * sw + pw] = len(rows)
            if rows:
                table[ph * sw + pw, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
    return count.to(device), table.to(device)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _wgrad_chunk(L: int, KG: int, CG: int, RS: int, K: int, groups: int, device: torch.device) -> int:
    """Pixels per wgrad split. Under the interpreter a fixed 64 so test sizes take several
    splits. On a GPU enough splits to give ~2 programs per SM when counted with the largest
    tile (the reduction is long, the output small), each at least 512 pixels, and the fp32
    workspace at most ~256 MB. A multiple of 64, so every BLOCK_K tiles a chunk exactly."""
    if INTERPRET or device.type != "cuda":
        return 64
    tiles = triton.cdiv(KG, 128) * triton.cdiv(CG, 128) * RS * groups
    index = device.index if device.index is not None else torch.cuda.current_device()
    split = triton.cdiv(2 * _sm_count(index), tiles)
    split = min(split, triton.cdiv(L, 512), 65535 // groups, max(1, (64 << 20) // (K * RS * CG)))
    split = max(split, 1)
    return triton.cdiv(triton.cdiv(L, split), 64) * 64


def _merge_tile(C: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) of the partial-sum merge; small under the interpreter so that test
    sizes still take several chunks."""
    if INTERPRET:
        return 4, min(16, triton.next_power_of_2(C))
    return 128, min(32, triton.next_power_of_2(C))


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
    """``(grad_input, grad_weight, sum_g, sum_g_xhat)`` of ``_ref.conv_bn_backward``.

    ``grad`` (and ``grad_y``) are (N, K, P, Q), ``grad_coef`` (4, K) rows (mean, grad_scale, mean_g, xhat_coef) or None;
    ``x`` (N, C, H, W) and ``weight`` (K, C/groups, R, S); ``scale_in``, ``shift_in``,
    ``mean_in``, ``invstd_in`` (C,) or all None. ``grad_input`` is in ``x.dtype``, channels_last,
    ``grad_weight`` in ``weight.dtype``, contiguous; an output not asked for in ``output_mask`` is
    empty, and so are the sums without ``scale_in`` or ``grad_input``. Accumulation (and the
    sums) in fp32, fp64 for fp64 inputs. Inputs in another memory format are copied to
    channels_last first. Operands are validated by ``fusedres.ops``.
    """
    (N, C, H, W, K, CG, KG, R, S, P, Q,
     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w) = conv_sizes(x, weight, stride, padding, dilation, groups)

    cl = torch.channels_last
    dev = x.device
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    tl_acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    has_coef = grad_coef is not None
    has_prologue = scale_in is not None
    need_input, need_weight = bool(output_mask[0]), bool(output_mask[1])

    grad = grad.contiguous(memory_format=cl)
    x = x.contiguous(memory_format=cl)
    # Absent operands get a dummy pointer; the constexpr flags compile their loads away.
    grad_y_arg = grad_y.contiguous(memory_format=cl) if has_coef else grad
    coef_arg = grad_coef.to(acc_dtype).contiguous() if has_coef else grad
    vec_args = [v.to(acc_dtype).contiguous() if has_prologue else x for v in (scale_in, shift_in, mean_in, invstd_in)]
    common = dict(
        HAS_COEF=has_coef,
        HAS_PROLOGUE=has_prologue,
        INPUT_PRECISION=input_precision(x.dtype),
        ACC_DTYPE=tl_acc,
        INTERPRET=INTERPRET,
    )

    # Distinct tensors even when empty: a custom op's outputs may not alias each other.
    sum_g, sum_gx = x.new_empty(0, dtype=acc_dtype), x.new_empty(0, dtype=acc_dtype)
    grad_input = x.new_empty(0)
    if need_input:
        grad_input = torch.empty((N, C, H, W), dtype=x.dtype, device=dev, memory_format=cl)
        if has_prologue:
            sum_g = torch.zeros(C, dtype=acc_dtype, device=dev)
            sum_gx = torch.zeros(C, dtype=acc_dtype, device=dev)
        if grad_input.numel():
            _dgrad(grad, grad_y_arg, coef_arg, weight, x, vec_args, grad_input, sum_g, sum_gx,
                   (N, H, W, C, P, Q, K, KG, CG, R, S, groups), (stride_h, stride_w), (pad_h, pad_w),
                   (dil_h, dil_w), common)

    grad_weight = weight.new_empty(0)
    if need_weight:
        grad_weight = _wgrad(grad, grad_y_arg, coef_arg, x, vec_args[:2], weight,
                             (N, H, W, C, P, Q, K, KG, CG, R, S, groups), (stride_h, stride_w),
                             (pad_h, pad_w), (dil_h, dil_w), common, acc_dtype)
    return grad_input, grad_weight, sum_g, sum_gx


def _dgrad(grad, grad_y, coef, weight, x, vec_args, grad_input, sum_g, sum_gx, dims, stride, padding,
           dilation, common):
    N, H, W, C, P, Q, K, KG, CG, R, S, groups = dims
    stride_h, stride_w = stride
    dev = x.device
    weight = weight.contiguous(memory_format=torch.channels_last)  # KRSC
    tap_count, tap_table = _phase_taps(R, S, stride, padding, dilation, dev)
    phases = stride_h * stride_w
    m0 = N * triton.cdiv(H, stride_h) * triton.cdiv(W, stride_w)
    with_sums = common["HAS_PROLOGUE"]
    if with_sums:
        # Sized for the smallest BLOCK_M the autotuner may pick; the merge reads only the rows
        # written by the chosen config.
        max_tiles = phases * triton.cdiv(m0, min(c.kwargs["BLOCK_M"] for c in _CONFIGS))
        part_g = torch.empty((max_tiles, C), dtype=sum_g.dtype, device=dev)
        part_gx = torch.empty_like(part_g)
    else:
        part_g = part_gx = grad_input

    def grid(meta):
        return (triton.cdiv(m0, meta["BLOCK_M"]), triton.cdiv(CG, meta["BLOCK_N"]), groups * phases)

    _dgrad_kernel[grid](
        grad, grad_y, coef, weight, x, *vec_args,
        grad_input, part_g, part_gx, tap_count, tap_table,
        N, H, W, C, P, Q, K, KG, CG, m0, groups,
        stride_h, stride_w, dilation[0], dilation[1],
        R=R,
        S=S,
        **common,
    )
    if with_sums:
        tiles = phases * triton.cdiv(m0, _dgrad_kernel.best_config.kwargs["BLOCK_M"])
        block_t, block_c = _merge_tile(C)
        _sum_partials_kernel[(triton.cdiv(C, block_c),)](
            part_g, part_gx, sum_g, sum_gx,
            tiles, C,
            ACC_DTYPE=common["ACC_DTYPE"],
            BLOCK_T=block_t,
            BLOCK_C=block_c,
        )


def _wgrad(grad, grad_y, coef, x, vec_args, weight, dims, stride, padding, dilation, common, acc_dtype):
    N, H, W, C, P, Q, K, KG, CG, R, S, groups = dims
    L = N * P * Q
    if L == 0 or weight.numel() == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    chunk = _wgrad_chunk(L, KG, CG, R * S, K, groups, x.device)
    split = triton.cdiv(L, chunk)
    # Every (split, tile) writes its own slice, so the workspace needs no zeroing.
    ws = torch.empty((split, K, R, S, CG), dtype=acc_dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(KG, meta["BLOCK_M"]), R * S * triton.cdiv(CG, meta["BLOCK_N"]), groups * split)

    _wgrad_kernel[grid](
        grad, grad_y, coef, x, *vec_args, ws,
        H, W, C, P, Q, K, KG, CG, L, chunk, groups,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=R,
        S=S,
        **common,
    )
    # Fixed-order sum over the splits in the accumulation dtype, one rounding to weight's dtype.
    return ws.sum(0).to(weight.dtype).permute(0, 3, 1, 2).contiguous()
