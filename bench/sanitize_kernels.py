"""Runs every CUDA kernel of ``fusedres._C`` on small awkward shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m bench.sanitize_kernels

(without PyTorch's caching allocator every tensor is its own allocation, so memcheck sees a read
or write past any tensor's end). ``torch.ops.fusedres.conv_bn_act`` and ``bn_act_backward`` run
in fp32, fp16 and bf16 over odd channel counts, groups, stride 2, 1x1/3x3/7x7 filters, odd
spatial sizes and every epilogue (scale, shift, residual, ReLU, and none of them); each result
is also checked against the unfused reference, so a kernel that reads garbage fails here too.
``--quick`` runs one dtype and half the shapes (for the slower racecheck and synccheck tools).
Exits 0 when every result matches, 1 otherwise, 2 when there are no CUDA kernels to run.
"""

from __future__ import annotations

import argparse
import itertools
import sys

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
# (scale, shift, residual, relu)
EPILOGUES = {
    "scale_shift_residual_relu": (True, True, True, True),
    "shift_relu": (False, True, False, True),
    "scale_identity": (True, False, False, False),
    "bare_conv": (False, False, False, False),
}
# Relative max error vs the fp64 reference; fp32 may run on TF32 tensor cores.
TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def run_case(shape, epilogue, dtype: torch.dtype, layout: torch.memory_format, device: torch.device) -> list[str]:
    """Runs both ops on one case; returns the names of the results that do not match."""
    n, c, h, w, k, r, s, stride, padding, groups = shape
    has_scale, has_shift, has_residual, relu = epilogue
    p = (h + 2 * padding - r) // stride + 1
    q = (w + 2 * padding - s) // stride + 1

    def activation(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device).to(dtype).contiguous(memory_format=layout)

    x = activation(n, c, h, w)
    weight = (torch.randn(k, c // groups, r, s, device=device) / (c // groups * r * s) ** 0.5).to(dtype)
    scale = torch.rand(k, device=device) + 0.5 if has_scale else None
    shift = torch.randn(k, device=device) if has_shift else None
    residual = activation(n, k, p, q) if has_residual else None
    conv = ([stride] * 2, [padding] * 2, [1, 1], groups)

    out = torch.ops.fusedres.conv_bn_act(x, weight, scale, shift, residual, *conv, relu)

    def f64(t):
        return None if t is None else t.double()

    expected = _ref.conv_bn_act(f64(x), f64(weight), f64(scale), f64(shift), f64(residual), *conv, relu)
    mismatches = []
    if not relative_error(out, expected) <= TOLERANCE[dtype]:
        mismatches.append("conv_bn_act")

    grad_out = activation(n, k, p, q)
    conv_out = activation(n, k, p, q) if has_scale else None
    grads = torch.ops.fusedres.bn_act_backward(grad_out, out, scale, conv_out, relu)
    expected_grads = _ref.bn_act_backward(f64(grad_out), f64(out), f64(scale), f64(conv_out), relu)
    names = ("grad_conv", "grad_shift", "grad_scale")
    for name, got, want in zip(names, grads, expected_grads):
        if want.numel() and not relative_error(got, want) <= TOLERANCE[dtype]:
            mismatches.append(f"bn_act_backward.{name}")
    return mismatches


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
    failures = []
    cases = list(itertools.product(shapes.items(), EPILOGUES.items(), dtypes, (CL, torch.contiguous_format)))
    for (shape_name, shape), (epilogue_name, epilogue), dtype, layout in cases:
        bad = run_case(shape, epilogue, dtype, layout, torch.device("cuda"))
        if bad:
            failures.append(f"{shape_name} {epilogue_name} {dtype} {layout}: {', '.join(bad)}")
    torch.cuda.synchronize()
    for failure in failures:
        print(f"MISMATCH {failure}")
    print(f"sanitize_kernels: {len(cases)} cases, {len(failures)} mismatched")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
