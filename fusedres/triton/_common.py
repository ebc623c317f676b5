"""Helpers shared by the Triton kernels: interpreter detection, tile configs, rounding."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Read once, like Triton's own flag: set TRITON_INTERPRET=1 before importing these modules.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def conv_configs() -> list[triton.Config]:
    if INTERPRET:
        # The interpreter ignores warps/stages and its cost grows with the number of programs;
        # 16-wide N and K tiles (tl.dot's minimum) still span several blocks at test sizes.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, num_stages=1)]
    tiles = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 4),
        # Narrow N for grouped convs with few output channels per group.
        (128, 32, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


@triton.jit
def round_to(y, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Round fp32 ``y`` to ``DTYPE`` to nearest even, identically on a GPU and in the interpreter.

    The interpreter's fp32 -> bf16 cast truncates (about 2x the error of the GPU's ``cvt.rn``),
    so there bf16 is rounded in integer ops, bit for bit what the GPU does; NaN stays NaN.
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(y != y, y.to(tl.bfloat16), rounded)
    else:
        return y.to(DTYPE)


def input_precision(dtype: torch.dtype) -> str:
    # Only fp32 operands are affected (fp16/bf16 ignore it); the interpreter computes in fp32.
    # The flag is the one eager convolutions follow, as in the CUDA backend.
    if INTERPRET or (dtype == torch.float32 and not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


def conv_out_size(size: int, kernel: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


class ConvSizes(NamedTuple):
    """A conv's sizes as the kernels take them: x (N, C, H, W), weight (K, CG, R, S) with CG = C
    per group and KG = K per group, output P x Q, and the per-axis stride, padding, dilation."""

    N: int
    C: int
    H: int
    W: int
    K: int
    CG: int
    KG: int
    R: int
    S: int
    P: int
    Q: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int


def conv_sizes(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> ConvSizes:
    N, C, H, W = x.shape
    K, CG, R, S = weight.shape
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = ((int(a), int(b)) for a, b in (stride, padding, dilation))
    P = conv_out_size(H, R, stride_h, pad_h, dil_h)
    Q = conv_out_size(W, S, stride_w, pad_w, dil_w)
    return ConvSizes(N, C, H, W, K, CG, K // groups, R, S, P, Q, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)


def elementwise_tile(K: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps): ~8K elements per tile on a GPU; small under the interpreter
    so that test-sized inputs still span several row blocks."""
    block_k = min(64, triton.next_power_of_2(K))
    if INTERPRET:
        return 32, min(16, block_k), 4
    return max(32, 8192 // block_k), block_k, 8


@triton.jit
def rows_by_channels_tile(ROWS, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's (BLOCK_R rows) x (BLOCK_K channels) tile of a dense rows x K (NPQK) view:
    ``(pid_r, offs_r, offs_k, k_mask, mask, offs)``, index math in int64."""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    mask = (offs_r < ROWS)[:, None] & k_mask[None, :]
    return pid_r, offs_r, offs_k, k_mask, mask, offs_r[:, None] * K + offs_k[None, :]
