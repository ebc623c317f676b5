"""Every CUDA kernel of csrc/**/*_cuda.cu, executed on the CPU by the emulator of
tests/cuda_emulator (a fiber per CUDA thread, real barriers, shared memory poisoned per block,
WMMA with the hardware's alignment rules) through its real launcher, against fusedres.ops._ref
on fresh random data with NaN-poisoned outputs, in forward, reverse and seeded random thread order.

Select with ``pytest -m emulated tests``. FUSEDRES_EMULATOR_VARIANT=asan runs the same cases on
the ASan+UBSan build (test_sanitizer_build does that in a subprocess).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedres.ops import _ref
from tests.conftest import assert_matches_reference
from tests.cuda_emulator import build
from tests.cuda_emulator.emulator import DTYPE_CODE, Emulator, int64s, ptr

pytestmark = pytest.mark.emulated

VARIANT = os.environ.get("FUSEDRES_EMULATOR_VARIANT", "plain")
ORDERS = ["forward", "reverse", "random"]
CL = torch.channels_last
# (storage dtype, allow_tf32): what each conv kernel's math mode sees.
MATHS = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emu() -> Emulator:
    if build.cuda_include() is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) to build the emulator against")
    return Emulator(VARIANT)


@pytest.fixture(params=ORDERS)
def order(request, emu) -> str:
    emu.configure(request.param, seed=20240611)
    return request.param


def _budget_key(dtype: torch.dtype, tf32: bool):
    return "tf32" if tf32 else dtype


def _check(actual, expected, dtype, tf32=False, baseline=None, what="output"):
    key = _budget_key(dtype, tf32)
    assert_matches_reference(actual, expected, key, baseline if not tf32 else None, what=what)


def _nhwc(t: torch.Tensor, misaligned: bool = False) -> torch.Tensor:
    """t as a dense NHWC tensor; misaligned: its data one element past a 16-byte boundary."""
    if not misaligned:
        return t.contiguous(memory_format=CL)
    n, c, h, w = t.shape
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    out.copy_(t)
    return out


def _poisoned(n, c, h, w, dtype) -> torch.Tensor:
    return torch.full((n, c, h, w), float("nan"), dtype=dtype).contiguous(memory_format=CL)


def _nan(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def _krsc(w: torch.Tensor) -> torch.Tensor:
    return w.permute(0, 2, 3, 1).contiguous()


def _out_size(size, kernel, stride, pad, dil):
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


def _geometry(n, c, h, w, k, r, s, stride, pad, dil, groups):
    p, q = _out_size(h, r, stride, pad, dil), _out_size(w, s, stride, pad, dil)
    return int64s([n, h, w, c, k, r, s, p, q, stride, stride, pad, pad, dil, dil, groups]), p, q


def _double(*ts):
    return [None if t is None else t.double() for t in ts]


# --- conv_bn_act -------------------------------------------------------------------------------

# (N, C, H, W, K, R, S, stride, padding, dilation, groups), residual kind, x misaligned
CONV_BN_ACT_CASES = {
    "3x3_two_row_tiles": ((2, 16, 9, 9, 24, 3, 3, 1, 1, 1, 1), "none", False),
    "3x3_identity_residual": ((1, 32, 5, 7, 16, 3, 3, 1, 1, 1, 1), "same", False),
    "3x3_stride2_option_a": ((2, 8, 8, 8, 16, 3, 3, 2, 1, 1, 1), "option_a", False),
    "stem_narrow": ((1, 3, 7, 7, 8, 3, 3, 2, 1, 1, 1), "none", False),
    "1x1_groups_odd_k": ((2, 8, 6, 5, 70, 1, 1, 2, 0, 1, 2), "same", False),
    "3x3_dilation2_misaligned": ((1, 8, 9, 9, 8, 3, 3, 1, 2, 2, 1), "none", True),
}


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("math_mode", list(MATHS))
@pytest.mark.parametrize("case", list(CONV_BN_ACT_CASES))
def test_conv_bn_act(emu, order, case, math_mode, relu):
    shape, residual_kind, misaligned = CONV_BN_ACT_CASES[case]
    dtype, tf32 = MATHS[math_mode]
    n, c, h, w, k, r, s, stride, pad, dil, groups = shape
    geom, p, q = _geometry(*shape)
    x = _nhwc(torch.randn(n, c, h, w).to(dtype), misaligned)
    weight = (torch.randn(k, c // groups, r, s) / math.sqrt(c // groups * r * s)).to(dtype)
    scale, shift = torch.rand(k) + 0.5, torch.randn(k) * 0.5
    residual, rgeom, rstride = None, None, 1
    if residual_kind == "same":
        residual = _nhwc(torch.randn(n, k, p, q).to(dtype))
        rgeom = int64s([p, q, p, q, k, 1])
    elif residual_kind == "option_a":
        residual, rstride = x, 2  # the block input: subsampled, channels zero-extended to K
        rgeom = int64s([p, q, h, w, c, 2])
    out = _poisoned(n, k, p, q, dtype)
    weight_krsc = _krsc(weight)
    emu.run("emu_conv_bn_act", geom, DTYPE_CODE[dtype], ptr(x), ptr(weight_krsc), ptr(scale), ptr(shift),
            ptr(residual), rgeom, ptr(out), relu, tf32)
    conv = (stride, stride), (pad, pad), (dil, dil), groups
    exact = _ref.conv_bn_act(*_double(x, weight, scale, shift, residual), *conv, relu, rstride)
    base = _ref.conv_bn_act(x, weight, scale, shift, residual, *conv, relu, rstride)
    _check(out, exact, dtype, tf32, base)


# --- conv_bn_stats -----------------------------------------------------------------------------

CONV_BN_STATS_CASES = {
    "3x3_two_row_tiles": (2, 16, 9, 9, 24, 3, 3, 1, 1, 1, 1),
    "stem_narrow_stride2": (1, 3, 7, 7, 8, 3, 3, 2, 1, 1, 1),
    "1x1_groups_odd_k": (2, 8, 6, 5, 70, 1, 1, 2, 0, 1, 2),
    # 18 row tiles: more than the 16 merge lanes; K = 40 needs two merge blocks.
    "1x1_every_merge_lane": (2, 8, 33, 33, 40, 1, 1, 1, 0, 1, 1),
}


@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu_prologue", "as_stored"])
@pytest.mark.parametrize("math_mode", list(MATHS))
@pytest.mark.parametrize("case", list(CONV_BN_STATS_CASES))
def test_conv_bn_stats(emu, order, case, math_mode, prologue):
    shape = CONV_BN_STATS_CASES[case]
    dtype, tf32 = MATHS[math_mode]
    n, c, h, w, k, r, s, stride, pad, dil, groups = shape
    geom, p, q = _geometry(*shape)
    x = _nhwc(torch.randn(n, c, h, w).to(dtype))
    weight = (torch.randn(k, c // groups, r, s) / math.sqrt(c // groups * r * s)).to(dtype)
    scale_in = shift_in = None
    if prologue:
        scale_in, shift_in = torch.rand(c) + 0.5, torch.randn(c)
    tiles = emu.size("emu_conv_bn_stats_num_partials", geom)
    y, mean, m2 = _poisoned(n, k, p, q, dtype), _nan(k), _nan(k)
    workspace = _nan(2 * k * tiles)
    weight_krsc = _krsc(weight)
    emu.run("emu_conv_bn_stats", geom, DTYPE_CODE[dtype], ptr(x), ptr(weight_krsc), ptr(scale_in),
            ptr(shift_in), ptr(y), ptr(mean), ptr(m2), ptr(workspace), tf32)
    # The kernel convolves the activation rounded to the storage type, as the reference does.
    act = x if scale_in is None else _ref.bn_act(x, scale_in, shift_in)
    conv = (stride, stride), (pad, pad), (dil, dil), groups
    exact = torch.nn.functional.conv2d(act.double(), weight.double(), None, *conv)
    base = _ref.conv_bn_stats(x, weight, scale_in, shift_in, *conv)[0]
    _check(y, exact, dtype, tf32, base, what="y")
    # Statistics of y as stored, merged from per-tile partials: fp32 accuracy whatever the dtype.
    stored = y.double()
    want_mean = stored.mean(dim=(0, 2, 3))
    want_m2 = (stored - want_mean.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    assert_matches_reference(mean, want_mean, torch.float32, what="mean")
    assert_matches_reference(m2, want_m2, torch.float32, what="m2")


# --- bn_finalize -------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("running", [torch.float32, torch.float16, torch.bfloat16, None], ids=str)
def test_bn_finalize(emu, order, running, affine):
    k, count, momentum, eps = 300, 50, 0.1, 1e-5  # 300 channels: two blocks of 256
    mean, m2 = torch.randn(k), torch.rand(k) * count + 0.1
    weight, bias = (torch.rand(k) + 0.5, torch.randn(k)) if affine else (None, None)
    running_mean = running_var = None
    if running is not None:
        running_mean, running_var = torch.randn(k).to(running), (torch.rand(k) + 0.5).to(running)
    before = _double(running_mean, running_var)
    scale, shift, invstd = _nan(k), _nan(k), _nan(k)
    emu.run("emu_bn_finalize", k, count, ptr(mean), ptr(m2), ptr(weight), ptr(bias), ptr(running_mean),
            ptr(running_var), DTYPE_CODE[running or torch.float32], momentum, eps, ptr(scale), ptr(shift),
            ptr(invstd))
    exact = _ref.bn_finalize(*_double(mean, m2), count, *_double(weight, bias), *before, momentum, eps)
    for name, got, want in zip(("scale", "shift", "invstd"), (scale, shift, invstd), exact):
        assert_matches_reference(got, want, torch.float32, what=name)
    if running is not None:
        for name, got, want in (("running_mean", running_mean, before[0]), ("running_var", running_var, before[1])):
            assert_matches_reference(got, want, running, what=name)


# --- bn_add_act --------------------------------------------------------------------------------

# channels K, shortcut channels C (option A): the wide path needs K, C multiples of 16 bytes.
LAYOUTS = {"wide": (16, 8, False), "narrow_odd_channels": (13, 5, False), "narrow_misaligned": (16, 8, True)}


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("shortcut", ["none", "identity", "projection", "option_a"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_add_act(emu, order, dtype, layout, shortcut, relu):
    k, c_a, misaligned = LAYOUTS[layout]
    n, p, q = 2, 5, 6
    y = _nhwc(torch.randn(n, k, p, q).to(dtype), misaligned)
    scale, shift = torch.rand(k) + 0.5, torch.randn(k)
    sc = sc_scale = sc_shift = sgeom = None
    stride = 1
    if shortcut in ("identity", "projection"):
        sc = _nhwc(torch.randn(n, k, p, q).to(dtype))
        sgeom = int64s([p, q, p, q, k, 1])
        if shortcut == "projection":
            sc_scale, sc_shift = torch.rand(k) + 0.5, torch.randn(k)
    elif shortcut == "option_a":
        h, w, stride = 2 * p, 2 * q - 1, 2
        sc = _nhwc(torch.randn(n, c_a, h, w).to(dtype))
        sgeom = int64s([p, q, h, w, c_a, 2])
    out = _poisoned(n, k, p, q, dtype)
    emu.run("emu_bn_add_act", n * p * q, k, DTYPE_CODE[dtype], ptr(y), ptr(scale), ptr(shift), ptr(sc), sgeom,
            ptr(sc_scale), ptr(sc_shift), ptr(out), relu)
    exact = _ref.bn_add_act(*_double(y, scale, shift, sc, sc_scale, sc_shift), stride, relu)
    base = _ref.bn_add_act(y, scale, shift, sc, sc_scale, sc_shift, stride, relu)
    _check(out, exact, dtype, baseline=base)


# --- bn_act_backward ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False], ids=["scale", "no_scale"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_backward(emu, order, dtype, relu, scale):
    n, k, p, q = 2, 40, 10, 11  # 220 rows: 4 slabs; 40 channels: 2 channel blocks
    rows = n * p * q
    grad_out = _nhwc(torch.randn(n, k, p, q).to(dtype))
    out = _nhwc(torch.relu(torch.randn(n, k, p, q)).to(dtype))
    scale_t = torch.rand(k) + 0.5 if scale else None
    grad_conv, grad_shift = _poisoned(n, k, p, q, dtype), _nan(k)
    workspace = _nan(k * emu.size("emu_bn_act_backward_num_partials", rows))
    emu.run("emu_bn_act_backward", rows, k, DTYPE_CODE[dtype], ptr(grad_out), ptr(out), ptr(scale_t),
            ptr(grad_conv), ptr(grad_shift), ptr(workspace), relu)
    exact = _ref.bn_act_backward(*_double(grad_out, out, scale_t), relu)
    base = _ref.bn_act_backward(grad_out, out, scale_t, relu)
    _check(grad_conv, exact[0], dtype, baseline=base[0], what="grad_conv")
    assert_matches_reference(grad_shift, exact[1], torch.float32, what="grad_shift")


# --- bn_backward (reduce + elemt) --------------------------------------------------------------


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("mask", ["none", "output", "prologue"])
@pytest.mark.parametrize("layout", ["wide", "narrow_odd_channels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_backward(emu, order, dtype, layout, mask, weight):
    n, k, p, q = 2, (16 if layout == "wide" else 13), 10, 11  # 220 rows: 4 slabs
    rows, count = n * p * q, n * p * q
    grad = _nhwc(torch.randn(n, k, p, q).to(dtype))
    y = _nhwc((torch.randn(n, k, p, q) * 2 + 1).to(dtype))
    mean, invstd = torch.randn(k) + 1, torch.rand(k) + 0.5
    act_out = act_scale = act_shift = None
    if mask == "output":
        act_out = _nhwc(torch.relu(torch.randn(n, k, p, q)).to(dtype))
    elif mask == "prologue":
        act_scale, act_shift = torch.rand(k) + 0.5, torch.randn(k)
    masks = (act_out, act_scale, act_shift)
    sum_g, sum_g_xhat = _nan(k), _nan(k)
    workspace = _nan(2 * k * emu.size("emu_bn_backward_num_partials", rows))
    emu.run("emu_bn_backward_reduce", rows, k, DTYPE_CODE[dtype], ptr(grad), ptr(y), ptr(mean), ptr(invstd),
            *map(ptr, masks), ptr(sum_g), ptr(sum_g_xhat), ptr(workspace))
    exact = _ref.bn_backward_reduce(*_double(grad, y, mean, invstd, *masks))
    assert_matches_reference(sum_g, exact[0], torch.float32, what="sum_g")
    assert_matches_reference(sum_g_xhat, exact[1], torch.float32, what="sum_g_xhat")

    weight_t = torch.rand(k) + 0.5 if weight else None
    sums = [e.float() for e in exact]  # the same sums for kernel and reference: dy alone is judged
    grad_input = _poisoned(n, k, p, q, dtype)
    emu.run("emu_bn_backward_elemt", rows, k, DTYPE_CODE[dtype], ptr(grad), ptr(y), ptr(mean), ptr(invstd),
            ptr(weight_t), ptr(sums[0]), ptr(sums[1]), count, *map(ptr, masks), ptr(grad_input))
    want = _ref.bn_backward_elemt(*_double(grad, y, mean, invstd, weight_t, *sums), count, *_double(*masks))
    base = _ref.bn_backward_elemt(grad, y, mean, invstd, weight_t, *sums, count, *masks)
    _check(grad_input, want, dtype, baseline=base, what="grad_input")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_reductions_of_an_empty_batch(emu, order, dtype):
    """rows == 0: the kernels still run, read nothing (null data) and write zero sums."""
    k = 40
    code = DTYPE_CODE[dtype]
    grad_shift = _nan(k)
    workspace = _nan(2 * k * emu.size("emu_bn_backward_num_partials", 0))
    emu.run("emu_bn_act_backward", 0, k, code, None, None, None, None, ptr(grad_shift), ptr(workspace), True)
    assert torch.equal(grad_shift, torch.zeros(k))
    sum_g, sum_g_xhat, mean, invstd = _nan(k), _nan(k), torch.randn(k), torch.rand(k) + 0.5
    emu.run("emu_bn_backward_reduce", 0, k, code, None, None, ptr(mean), ptr(invstd), None, None, None, ptr(sum_g),
            ptr(sum_g_xhat), ptr(workspace))
    assert torch.equal(sum_g, torch.zeros(k)) and torch.equal(sum_g_xhat, torch.zeros(k))


# --- conv_bn_backward --------------------------------------------------------------------------

CONV_BN_BACKWARD_CASES = {
    # 338 output rows: 11 reduction slices, split-K in 2; dgrad over 3 row tiles
    "3x3_split_k_odd": (2, 16, 13, 13, 24, 3, 3, 1, 1, 1, 1),
    "3x3_stride2_odd": (1, 8, 7, 9, 16, 3, 3, 2, 1, 1, 1),
    "1x1_stride2_groups_narrow": (2, 12, 6, 5, 20, 1, 1, 2, 0, 1, 2),
    "stem_narrow": (1, 3, 9, 9, 8, 3, 3, 1, 1, 1, 1),
    "3x3_dilation2": (1, 8, 9, 9, 8, 3, 3, 1, 2, 2, 1),
}
# (BN-backward prologue on the gradient, BN+ReLU prologue on the input with dgrad mask + sums,
# output_mask)
FUSIONS = {
    "plain": (False, False, (True, True)),
    "both": (True, True, (True, True)),
    "wgrad_input_prologue": (False, True, (False, True)),
    "grad_prologue": (True, False, (True, True)),
    "dgrad_only": (False, False, (True, False)),
}


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("math_mode", list(MATHS))
@pytest.mark.parametrize("case", list(CONV_BN_BACKWARD_CASES))
def test_conv_bn_backward(emu, order, case, math_mode, fusion):
    shape = CONV_BN_BACKWARD_CASES[case]
    bn_grad, prologue, output_mask = FUSIONS[fusion]
    dtype, tf32 = MATHS[math_mode]
    n, c, h, w, k, r, s, stride, pad, dil, groups = shape
    geom, p, q = _geometry(*shape)
    x = _nhwc(torch.randn(n, c, h, w).to(dtype))
    weight = (torch.randn(k, c // groups, r, s) / math.sqrt(c // groups * r * s)).to(dtype)
    grad = _nhwc(torch.randn(n, k, p, q).to(dtype))
    grad_y = coef = scale_in = shift_in = mean_in = invstd_in = None
    if bn_grad:
        grad_y = _nhwc((torch.randn(n, k, p, q) * 2 + 1).to(dtype))
        cnt = n * p * q
        sums = torch.randn(k) * cnt**0.5, torch.randn(k) * cnt**0.5
        coef = _ref.bn_backward_coef(torch.randn(k) + 1, torch.rand(k) + 0.5, torch.rand(k) + 0.5, *sums, cnt)
    if prologue:
        scale_in, shift_in = torch.rand(c) + 0.5, torch.randn(c)
        mean_in, invstd_in = torch.randn(c), torch.rand(c) + 0.5
    with_sums = prologue and output_mask[0]
    grad_input = _poisoned(n, c, h, w, dtype) if output_mask[0] else None
    grad_weight = _nan(k, c // groups, r, s, dtype=dtype) if output_mask[1] else None
    sum_g, sum_g_xhat = (_nan(c), _nan(c)) if with_sums else (None, None)
    floats = emu.size("emu_conv_bn_backward_workspace_floats", geom, with_sums, output_mask[1])
    workspace = _nan(max(floats, 1))
    weight_krsc = _krsc(weight)
    emu.run("emu_conv_bn_backward", geom, DTYPE_CODE[dtype], ptr(grad), ptr(grad_y), ptr(coef), ptr(x),
            ptr(weight_krsc), ptr(scale_in), ptr(shift_in), ptr(mean_in if with_sums else None),
            ptr(invstd_in if with_sums else None), ptr(grad_input), ptr(grad_weight), ptr(sum_g),
            ptr(sum_g_xhat), ptr(workspace), tf32)
    args = (grad, grad_y, coef, x, weight, scale_in, shift_in, mean_in, invstd_in)
    conv = (stride, stride), (pad, pad), (dil, dil), groups
    exact = _ref.conv_bn_backward(*_double(*args), *conv, list(output_mask))
    base = _ref.conv_bn_backward(*args, *conv, list(output_mask))
    if output_mask[0]:
        _check(grad_input, exact[0], dtype, tf32, base[0], what="grad_input")
    if output_mask[1]:
        _check(grad_weight, exact[1], dtype, tf32, base[1], what="grad_weight")
    if with_sums:
        # Sums of g as the kernel stored it.
        g = grad_input.double()
        xhat = (x.double() - mean_in.double().view(1, -1, 1, 1)) * invstd_in.double().view(1, -1, 1, 1)
        assert_matches_reference(sum_g, g.sum(dim=(0, 2, 3)), torch.float32, what="sum_g")
        assert_matches_reference(sum_g_xhat, (g * xhat).sum(dim=(0, 2, 3)), torch.float32, what="sum_g_xhat")


# --- coverage ----------------------------------------------------------------------------------

KERNEL_SOURCES = sorted((Path(__file__).resolve().parent.parent / "csrc").rglob("*_cuda.cu")) + sorted(
    (Path(__file__).resolve().parent.parent / "csrc").rglob("*.cuh")
)


def _global_functions() -> set[str]:
    names = set()
    for src in KERNEL_SOURCES:
        text = src.read_text()
        names.update(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text))
    return names


def _base_name(instantiation: str) -> str:
    return instantiation.split("<", 1)[0].rsplit("::", 1)[-1]


def test_every_kernel_instantiation_launched(emu, request):
    """Runs after the cases above (file order): every __global__ in csrc, and every template
    instantiation some launcher can reach (registered when the library loads), was launched."""
    if request.config.getoption("keyword") or VARIANT != "plain":
        pytest.skip("coverage is judged on a run of the whole file")
    registered = {k for k in emu.registered() if k.startswith("fusedres::")}
    launched = emu.launched()
    globals_ = _global_functions()
    assert globals_, "no __global__ functions parsed from csrc"
    assert globals_ <= {_base_name(k) for k in registered}, "a __global__ no launcher reaches"
    never = sorted(registered - set(launched))
    assert not never, f"{len(never)} of {len(registered)} kernel instantiations never launched:\n" + "\n".join(never)


def test_sanitizer_build():
    """The cases above on the ASan+UBSan build, in a subprocess with the ASan runtime preloaded:
    one thread order (random), which is enough for memory errors."""
    if VARIANT != "plain":
        pytest.skip("this is the sanitizer run")
    if build.cuda_include() is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) to build the emulator against")
    build.build("asan")
    env = dict(os.environ, FUSEDRES_EMULATOR_VARIANT="asan", LD_PRELOAD=build.sanitizer_preload(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-m", "emulated",
         "-k", "random and not sanitizer and not instantiation"],
        env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, f"sanitizer run failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
