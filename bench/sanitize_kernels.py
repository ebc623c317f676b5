"""Runs every op of ``fusedres._C`` on small awkward shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m bench.sanitize_kernels

(without PyTorch's caching allocator every tensor is its own allocation, so memcheck sees a read
or write past any tensor's end). Eval ops ``conv_bn_act`` (every epilogue, option-A residual)
and ``bn_act_backward``; train ops ``conv_bn_stats`` (with and without the BN+ReLU prologue),
``bn_finalize`` (with and without running statistics), ``bn_add_act`` (no, identity, projection
and option-A shortcut), ``bn_backward_reduce``/``bn_backward_elemt`` (ReLU mask from the
output, recomputed, none) and ``conv_bn_backward`` (each prologue, dgrad and wgrad alone). All in fp32, fp16 and bf16, channels_last and contiguous inputs, over
odd channel counts, groups, stride 2, 1x1/3x3/7x7 filters and odd spatial sizes. Every result is
also checked against the unfused reference (``fusedres.ops._ref``) in float64, so a kernel that
reads garbage fails here too. ``--quick``: fp16 and every other shape (for racecheck/synccheck).
Exits 0 when every result matches, 1 otherwise, 2 when there are no CUDA kernels to run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator

import torch

from fusedres import _extension
from fusedres.ops import _ref

CL = torch.channels_last
# (N, C, H, W, K, R, S, stride, padding, groups)
SHAPES = {
    "3x3_stride2_odd_channels": (2, 5, 13, 13, 7, 3, 3, 2, 1, 1),
    "3x3_groups4": (2, 16, 7, 7, 8, 3, 3, 1, 1, 4),
    "1x1_wide": (2, 64, 9, 9, 96, 1, 1, 1, 0, 1),
    "7x7_stride2_stem": (1, 3, 17, 17, 8, 7, 7, 2, 3, 1),
    "1x1_stride2_projection": (2, 128, 8, 8, 64, 1, 1, 2, 0, 1),
    "3x3_batch1_97x31": (1, 8, 97, 31, 12, 3, 3, 1, 1, 1),
}
# conv_bn_act's optional operands: (scale, shift, residual, relu)
EPILOGUES = {
    "scale_shift_residual_relu": (True, True, True, True),
    "shift_relu": (False, True, False, True),
    "scale_identity": (True, False, False, False),
    "bare_conv": (False, False, False, False),
}
# Relative max error vs the float64 reference; fp32 convs may run on TF32 tensor cores.
TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Arguments an op updates in place (compared after the call like its outputs).
MUTATED_ARGS = {"bn_finalize": (5, 6)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def calls(shape, dtype: torch.dtype, layout: torch.memory_format, device: torch.device) -> Iterator[tuple[str, str, tuple]]:
    """(variant, op name, arguments) for every op on one shape, covering its optional operands."""
    n, c, h, w, k, r, s, stride, padding, groups = shape
    p, q = (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1
    conv = ([stride] * 2, [padding] * 2, [1, 1], groups)

    def activation(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device).to(dtype).contiguous(memory_format=layout)

    def per_channel(size: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(size, device=device) * (high - low) + low

    x = activation(n, c, h, w)
    weight = (torch.randn(k, c // groups, r, s, device=device) / (c // groups * r * s) ** 0.5).to(dtype)
    for name, (has_scale, has_shift, has_residual, relu) in EPILOGUES.items():
        scale = per_channel(k, 0.5, 1.5) if has_scale else None
        shift = per_channel(k) if has_shift else None
        residual = activation(n, k, p, q) if has_residual else None
        yield name, "conv_bn_act", (x, weight, scale, shift, residual, *conv, relu, 1)
        grad_out, out = activation(n, k, p, q), activation(n, k, p, q)
        yield name, "bn_act_backward", (grad_out, out, scale, relu)
    # Option A: a strided shortcut with fewer channels, zero-extended (odd spatial size).
    option_a = activation(n, max(k // 2, 1), 2 * p - 1, 2 * q - 1)
    yield "option_a_residual", "conv_bn_act", (x, weight, None, per_channel(k), option_a, *conv, True, 2)

    scale_in, shift_in = per_channel(c, 0.5, 1.5), per_channel(c)
    yield "plain", "conv_bn_stats", (x, weight, None, None, *conv)
    yield "bn_relu_prologue", "conv_bn_stats", (x, weight, scale_in, shift_in, *conv)

    y = activation(n, k, p, q)
    y32 = y.float()
    mean = y32.mean(dim=(0, 2, 3))
    m2 = (y32 - mean.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    count = n * p * q
    gamma, beta = per_channel(k, 0.5, 1.5), per_channel(k)
    running = (per_channel(k), per_channel(k, 0.5, 2.0))
    yield "running_stats", "bn_finalize", (mean, m2, count, gamma, beta, *running, 0.1, 1e-5)
    yield "no_affine_no_running", "bn_finalize", (mean, m2, count, None, None, None, None, 0.1, 1e-5)

    scale, shift = per_channel(k, 0.5, 1.5), per_channel(k)
    yield "no_shortcut", "bn_add_act", (y, scale, shift, None, None, None, 1, True)
    yield "identity", "bn_add_act", (y, scale, shift, activation(n, k, p, q), None, None, 1, True)
    yield "projection", "bn_add_act", (y, scale, shift, activation(n, k, p, q), per_channel(k, 0.5, 1.5),
                                       per_channel(k), 1, True)
    yield "option_a", "bn_add_act", (y, scale, shift, option_a, None, None, 2, False)

    invstd = torch.rsqrt(m2 / count + 1e-5)
    grad = activation(n, k, p, q)
    masks = {"act_out": (activation(n, k, p, q), None, None), "recomputed": (None, scale, shift),
             "no_relu": (None, None, None)}
    for name, mask in masks.items():
        yield name, "bn_backward_reduce", (grad, y, mean, invstd, *mask)
        sum_g, sum_g_xhat = _ref.bn_backward_reduce(grad, y, mean, invstd, *mask)
        yield name, "bn_backward_elemt", (grad, y, mean, invstd, gamma, sum_g, sum_g_xhat, count, *mask)

    # The backward convs: BN-backward prologue on the gradient, BN+ReLU recompute on the input
    # (with the mask and the two sums in the dgrad epilogue), either GEMM alone.
    coef = _ref.bn_backward_coef(mean, invstd, gamma, sum_g, sum_g_xhat, count)
    prologue_in = (scale_in, shift_in, per_channel(c), per_channel(c, 0.5, 1.5))
    variants = {
        "both_prologues": (True, True, [True, True]),
        "grad_prologue_dgrad_only": (True, False, [True, False]),
        "input_prologue_wgrad_only": (False, True, [False, True]),
        "bare": (False, False, [True, True]),
    }
    for name, (with_coef, with_input, output_mask) in variants.items():
        grad_terms = (y, coef) if with_coef else (None, None)
        input_terms = prologue_in if with_input else (None,) * 4
        yield name, "conv_bn_backward", (grad, *grad_terms, x, weight, *input_terms, *conv, output_mask)


def _float64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def mismatches(op: str, args: tuple, dtype: torch.dtype) -> list[str]:
    """Runs ``op`` and its reference; names the outputs (and in-place arguments) that differ."""
    kernel_args = list(args)
    for i in MUTATED_ARGS.get(op, ()):
        if kernel_args[i] is not None:
            kernel_args[i] = kernel_args[i].clone()
    reference_args = [_float64(a) for a in args]
    got = getattr(torch.ops.fusedres, op)(*kernel_args)
    want = getattr(_ref, op)(*reference_args)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    for i in MUTATED_ARGS.get(op, ()):
        if args[i] is not None:
            got.append(kernel_args[i])
            want.append(reference_args[i])
    return [f"{op}[{i}]" for i, (g, e) in enumerate(zip(got, want, strict=True))
            if e.numel() and not relative_error(g, e) <= TOLERANCE[dtype]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fp16 only, every other shape")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not _extension.with_cuda_kernels():
        print("no CUDA kernels to run: needs a GPU and fusedres._C built with CUDA (python -m fusedres info)")
        return 2
    torch.manual_seed(0)
    dtypes = [torch.float16] if args.quick else [torch.float32, torch.float16, torch.bfloat16]
    shapes = dict(list(SHAPES.items())[:: 2 if args.quick else 1])
    failures, count = [], 0
    for (shape_name, shape), dtype, layout in itertools.product(shapes.items(), dtypes, (CL, torch.contiguous_format)):
        for variant, op, op_args in calls(shape, dtype, layout, torch.device("cuda")):
            count += 1
            bad = mismatches(op, op_args, dtype)
            if bad:
                failures.append(f"{shape_name} {variant} {dtype} {layout}: {', '.join(bad)}")
    torch.cuda.synchronize()
    for failure in failures:
        print(f"MISMATCH {failure}")
    print(f"sanitize_kernels: {count} op calls, {len(failures)} mismatched")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
