"""BatchNorm finalize: batch statistics -> per-channel ``(scale, shift, invstd)`` and the
running-statistics update of ``nn.BatchNorm2d``, as one tiny kernel over the K channels."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusedres.triton._common import INTERPRET, round_to


@triton.jit
def _bn_finalize_kernel(
    mean_ptr, m2_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
    scale_ptr, shift_ptr, invstd_ptr,
    K, count,
    momentum_hi, momentum_lo, eps_hi, eps_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For channels k, in ACC_DTYPE (fp32; fp64 for fp64 statistics):

        invstd[k] = 1 / sqrt(m2[k]/count + eps)            (biased variance, as BN normalises)
        scale[k]  = weight[k] * invstd[k]                   (weight = 1 if absent)
        shift[k]  = bias[k] - mean[k] * scale[k]            (bias = 0 if absent)
        running_mean[k] = (1 - momentum) * running_mean[k] + momentum * mean[k]
        running_var[k]  = (1 - momentum) * running_var[k] + momentum * m2[k]/max(count - 1, 1)

    Float scalars reach a kernel as fp32, so momentum and eps come as hi + lo fp32 pairs whose
    sum restores them to ~2^-48 for the fp64 path.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    momentum = tl.cast(momentum_hi, ACC_DTYPE) + tl.cast(momentum_lo, ACC_DTYPE)
    eps = tl.cast(eps_hi, ACC_DTYPE) + tl.cast(eps_lo, ACC_DTYPE)
    n = tl.cast(count, ACC_DTYPE)

    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    m2 = tl.load(m2_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    invstd = 1.0 / tl.sqrt(m2 / n + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(invstd_ptr + offs, invstd, mask=mask)
    tl.store(scale_ptr + offs, scale, mask=mask)
    tl.store(shift_ptr + offs, shift, mask=mask)

    if HAS_RUNNING:
        unbiased = m2 / tl.maximum(n - 1.0, 1.0)
        running_mean = tl.load(running_mean_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        running_var = tl.load(running_var_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * unbiased
        running_mean = round_to(running_mean, running_mean_ptr.dtype.element_ty, INTERPRET)
        running_var = round_to(running_var, running_var_ptr.dtype.element_ty, INTERPRET)
        tl.store(running_mean_ptr + offs, running_mean, mask=mask)
        tl.store(running_var_ptr + offs, running_var, mask=mask)


def _hi_lo(v: float) -> tuple[float, float]:
    """``v`` as two floats that are exact in fp32 and sum to ``v`` to ~2^-48."""
    hi = torch.tensor(v, dtype=torch.float32).item()
    return hi, v - hi


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
    """``(scale, shift, invstd)`` of shape (K,) in ``mean``'s dtype (fp32, or fp64), from the batch
    ``mean`` and ``m2`` over ``count`` values per channel; see ``_ref.bn_finalize``.

    ``running_mean`` / ``running_var`` (contiguous (K,) buffers, or both None) are updated in
    place with ``momentum`` (already resolved by the caller for ``momentum=None``); ``weight``
    and ``bias`` may be None (1 and 0). Operands are validated by ``fusedres.ops``.
    """
    K = mean.numel()
    scale = torch.empty_like(mean)
    shift = torch.empty_like(mean)
    invstd = torch.empty_like(mean)
    if K == 0:
        return scale, shift, invstd

    has_running = running_mean is not None
    # Absent operands get a dummy pointer; the constexpr flags compile their accesses away.
    weight_arg = weight.contiguous() if weight is not None else mean
    bias_arg = bias.contiguous() if bias is not None else mean
    rmean_arg = running_mean if has_running else mean
    rvar_arg = running_var if has_running else mean
    block_k = min(16 if INTERPRET else 1024, triton.next_power_of_2(K))
    _bn_finalize_kernel[(triton.cdiv(K, block_k),)](
        mean.contiguous(), m2.contiguous(), weight_arg, bias_arg, rmean_arg, rvar_arg,
        scale, shift, invstd,
        K, int(count),
        *_hi_lo(float(momentum)), *_hi_lo(float(eps)),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_RUNNING=has_running,
        ACC_DTYPE=tl.float64 if mean.dtype == torch.float64 else tl.float32,
        INTERPRET=INTERPRET,
        BLOCK_K=block_k,
    )
    return scale, shift, invstd
