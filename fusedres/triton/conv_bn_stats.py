"""Train-mode conv: ``y = conv(relu(x * scale_in + shift_in), W)`` with BatchNorm statistics of
``y`` accumulated in the epilogue.

The main loop is ``conv_bn_act.conv_tile`` with its BN+ReLU prologue on the loaded input. Each
(BLOCK_M pixels) x (BLOCK_N channels) tile stores its part of ``y`` and, per channel, the count,
mean and M2 of its rows into row ``pid_m`` of ``[num_m_tiles, K]`` buffers. A second, tiny
kernel merges those partials per channel in a fixed order (deterministic, no atomics) with
Chan's parallel formula, which stays exact where ``E[y^2] - E[y]^2`` cancels (|mean| >> std).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fusedres.triton._common import INTERPRET, conv_configs, conv_sizes, input_precision, round_to
from fusedres.triton.conv_bn_act import conv_tile

_CONFIGS = conv_configs()


@triton.autotune(
    configs=_CONFIGS,
    key=["M", "KG", "CG", "R", "S", "stride_h", "stride_w", "dil_h", "dil_w"],
)
@triton.jit
def _conv_bn_stats_kernel(
    x_ptr, w_ptr, scale_in_ptr, shift_in_ptr, y_ptr, part_mean_ptr, part_m2_ptr,
    H, W, C, P, Q, M, K, KG, CG,
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
    """One (BLOCK_M pixels) x (BLOCK_N channels) tile of one group of

        y[m, k] = conv(prologue(x), W)[m, k]                  (``conv_tile``, rounded to y's dtype)
        part_mean[pid_m, k] = (1/n) * sum_m y[m, k]
        part_m2[pid_m, k]   = sum_m (y[m, k] - part_mean[pid_m, k])^2

    over the tile's n = min(BLOCK_M, M - pid_m*BLOCK_M) valid rows, from y as stored (rounded,
    then widened to ACC_DTYPE), so the statistics describe the tensor BN will normalise.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    grp = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = conv_tile(
        x_ptr, w_ptr, scale_in_ptr, shift_in_ptr,
        offs_m, offs_n, grp,
        H, W, C, P, Q, M, KG, CG,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        R, S, HAS_PROLOGUE, INPUT_PRECISION, ACC_DTYPE, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K,
    )

    m_mask = offs_m < M
    n_mask = offs_n < KG
    k_glob = grp * KG + offs_n
    y = round_to(acc, y_ptr.dtype.element_ty, INTERPRET)
    tl.store(y_ptr + offs_m[:, None] * K + k_glob[None, :], y, mask=m_mask[:, None] & n_mask[None, :])

    y = tl.where(m_mask[:, None], y.to(ACC_DTYPE), 0.0)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC_DTYPE)
    mean = tl.sum(y, axis=0) / count
    dev = tl.where(m_mask[:, None], y - mean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    tl.store(part_mean_ptr + pid_m * K + k_glob, mean, mask=n_mask)
    tl.store(part_m2_ptr + pid_m * K + k_glob, m2, mask=n_mask)


@triton.jit
def _merge_stats_kernel(
    part_mean_ptr, part_m2_ptr, mean_ptr, m2_ptr,
    M, K, TILES, TILE_ROWS,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per channel k, merge the TILES partials (n_t, mean_t, M2_t), n_t = min(TILE_ROWS, M -
    t*TILE_ROWS), in order, BLOCK_T at a time. A chunk c of tiles is combined in one step,

        n_c = sum_t n_t,  mean_c = sum_t n_t*mean_t / n_c,
        M2_c = sum_t M2_t + sum_t n_t * (mean_t - mean_c)^2,

    then folded into the running (n, mean, M2) with Chan's pairwise formula

        delta = mean_c - mean;  mean += delta * n_c/(n + n_c);
        M2 += M2_c + delta^2 * n*n_c/(n + n_c);  n += n_c.

    Every term is a sum of squares of deviations, so nothing cancels however large the mean.
    """
    pid_k = tl.program_id(0).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K

    n = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        t_mask = t < TILES
        n_t = tl.where(t_mask, tl.minimum(M - t * TILE_ROWS, TILE_ROWS), 0).to(ACC_DTYPE)
        mask = t_mask[:, None] & k_mask[None, :]
        offs = t[:, None] * K + offs_k[None, :]
        mean_t = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        m2_t = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)

        n_c = tl.sum(n_t, axis=0)
        mean_c = tl.sum(n_t[:, None] * mean_t, axis=0) / n_c
        dev = tl.where(mask, mean_t - mean_c[None, :], 0.0)
        m2_c = tl.sum(m2_t, axis=0) + tl.sum(n_t[:, None] * dev * dev, axis=0)

        n_new = n + n_c
        delta = mean_c - mean
        mean = mean + delta * (n_c / n_new)
        m2 = m2 + m2_c + delta * delta * (n * n_c / n_new)
        n = n_new
    tl.store(mean_ptr + offs_k, mean, mask=k_mask)
    tl.store(m2_ptr + offs_k, m2, mask=k_mask)


def _merge_tile(K: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps) of the merge; small under the interpreter so that test
    sizes still take several chunks."""
    if INTERPRET:
        return 4, min(16, triton.next_power_of_2(K)), 4
    return 128, min(32, triton.next_power_of_2(K)), 4


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
    """``(y, mean, m2)``: ``y = conv2d(prologue(x), weight)`` and its per-channel statistics over
    N, P, Q (``_ref.conv_bn_stats``).

    ``prologue(x) = relu(x * scale_in + shift_in)`` when ``scale_in``/``shift_in`` (C,) are given
    (together), else ``x``. ``y`` is (N, K, P, Q) in ``x.dtype``, channels_last; ``mean`` and
    ``m2 = sum((y - mean)^2)`` are (K,) in fp32 (fp64 for fp64 inputs). Inputs in another memory
    format are copied to channels_last first. Operands are validated by ``fusedres.ops``.
    """
    (N, C, H, W, K, CG, KG, R, S, P, Q,
     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w) = conv_sizes(x, weight, stride, padding, dilation, groups)

    cl = torch.channels_last
    dev = x.device
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    y = torch.empty((N, K, P, Q), dtype=x.dtype, device=dev, memory_format=cl)
    M = N * P * Q
    mean = torch.empty(K, dtype=acc_dtype, device=dev)
    m2 = torch.empty(K, dtype=acc_dtype, device=dev)
    if M == 0:
        # What the reference gives for an empty batch: a NaN mean and zero M2.
        return y, mean.fill_(float("nan")), m2.zero_()

    x = x.contiguous(memory_format=cl)
    weight = weight.contiguous(memory_format=cl)
    has_prologue = scale_in is not None
    # Absent operands get a dummy pointer; the constexpr flag compiles their loads away.
    scale_arg = scale_in.to(acc_dtype).contiguous() if has_prologue else x
    shift_arg = shift_in.to(acc_dtype).contiguous() if has_prologue else x
    # Sized for the smallest BLOCK_M the autotuner may pick; the merge reads only the rows
    # written by the chosen config.
    max_tiles = triton.cdiv(M, min(c.kwargs["BLOCK_M"] for c in _CONFIGS))
    part_mean = torch.empty((max_tiles, K), dtype=acc_dtype, device=dev)
    part_m2 = torch.empty_like(part_mean)
    tl_acc = tl.float64 if acc_dtype == torch.float64 else tl.float32

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(KG, meta["BLOCK_N"]), groups)

    _conv_bn_stats_kernel[grid](
        x, weight, scale_arg, shift_arg, y, part_mean, part_m2,
        H, W, C, P, Q, M, K, KG, CG,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        R=R,
        S=S,
        HAS_PROLOGUE=has_prologue,
        INPUT_PRECISION=input_precision(x.dtype),
        ACC_DTYPE=tl_acc,
        INTERPRET=INTERPRET,
    )
    block_m = _conv_bn_stats_kernel.best_config.kwargs["BLOCK_M"]
    block_t, block_k, num_warps = _merge_tile(K)
    _merge_stats_kernel[(triton.cdiv(K, block_k),)](
        part_mean, part_m2, mean, m2,
        M, K, triton.cdiv(M, block_m), block_m,
        ACC_DTYPE=tl_acc,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return y, mean, m2
