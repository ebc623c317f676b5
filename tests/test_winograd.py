"""Winograd F(2x2, 3x3) eval convs on the CPU (``fusedres::winograd_conv_act[_]``) against a float64
conv, held to the error of oneDNN's direct fp32 conv on the same data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedres.ops import winograd
from tests.conftest import TOLERANCE, normwise_error, relative_error, run_isolated

CL = torch.channels_last
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    winograd.unusable_reason((3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, CPU) is not None,
    reason=str(winograd.unusable_reason((3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, CPU)))

# Error against float64, normwise: at most this many times the direct conv's, plus one fp32
# rounding (unit roundoff) of the terms' magnitude, ||conv(|x|, |W|) + |bias| + |residual|||. The
# floor matters only where the result cancels (tiny images, where the padded 4x4 tile holds a few
# taps): there the direct conv's error can be ~0 by luck while any summation order may err by
# ~u * |terms|. Measured over 150 seeds per shape: both stay below 1u of the terms; the ratio to
# the direct conv's is 0.6x at ResNet's sizes.
DIRECT_FACTOR = 2.0
UNIT_ROUNDOFF = 2.0 ** -24

# (N, C, K, H, W): 1x1 and 2x2 images, a single row, odd sizes (ragged last tiles), channels
# that are not multiples of 16 (vector tails), several tile blocks with a ragged last one, and
# K=130: three weight panels (64, 64, 2), split over two threads into 128 + 2 channels when the
# tiles are few.
SHAPES = [
    (1, 3, 5, 1, 1),
    (2, 17, 3, 2, 2),
    (1, 4, 6, 1, 7),
    (3, 17, 64, 5, 6),
    (1, 64, 64, 7, 9),
    (2, 64, 48, 15, 15),
    (3, 8, 8, 17, 19),
    (2, 20, 17, 6, 5),
    (2, 20, 130, 6, 5),
]


@pytest.fixture(params=[1, 2], ids=lambda t: f"{t}threads")
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _operands(n, c, k, h, w):
    x = torch.randn(n, c, h, w).contiguous(memory_format=CL)
    weight = torch.randn(k, c, 3, 3) / (9 * c) ** 0.5
    bias = torch.randn(k)
    residual = torch.randn(n, k, h, w).contiguous(memory_format=CL)
    return x, weight, bias, residual


def _conv(x, weight, bias, residual, relu):
    """The unfused eval conv in x's dtype: F.conv2d (oneDNN's direct conv in fp32)."""
    y = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=1)
    if residual is not None:
        y = y + residual.to(x.dtype)
    return y.relu() if relu else y


def _assert_close(actual, x, weight, bias, residual, relu):
    expected = _conv(x.double(), weight, bias, residual, relu)
    direct = _conv(x, weight, bias, residual, relu)
    assert actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=CL)
    assert not actual.isnan().any(), "NaN in the result (an unwritten element?)"
    terms = F.conv2d(x.double().abs(), weight.double().abs(), bias.double().abs(), padding=1)
    if residual is not None:
        terms = terms + residual.double().abs()
    floor = UNIT_ROUNDOFF * (terms.norm() / expected.norm().clamp_min(1e-300)).item()
    err, budget = normwise_error(actual, expected), DIRECT_FACTOR * normwise_error(direct, expected) + floor
    assert err <= budget, (f"normwise error {err:.3g} is over {DIRECT_FACTOR}x the direct conv's plus one rounding "
                           f"of the terms ({budget:.3g})")
    assert relative_error(actual, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_matches_float64_conv(shape, relu, with_residual, threads, poison_outputs):
    x, weight, bias, residual = _operands(*shape)
    residual = residual if with_residual else None
    out = torch.ops.fusedres.winograd_conv_act(x, winograd.transform_weight(weight), bias, residual, relu)
    _assert_close(out, x, weight, bias, residual, relu)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_in_place_matches_float64_conv(shape, relu, threads):
    # The buffer cannot be poisoned (the op reads it): an element left unwritten keeps the residual
    # and fails the comparison instead.
    x, weight, bias, residual = _operands(*shape)
    target = residual.clone()
    torch.ops.fusedres.winograd_conv_act_(target, x, winograd.transform_weight(weight), bias, relu)
    _assert_close(target, x, weight, bias, residual, relu)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_other_instruction_sets(capability, monkeypatch):
    # The transforms are compiled for AVX512, AVX2 and plain x86-64 and picked by torch's CPU
    # capability, which this variable lowers: each variant on every shape, in a fresh process.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    out = run_isolated(f"""
import torch
from tests.test_winograd import SHAPES, _assert_close, _operands, winograd
assert torch.backends.cpu.get_cpu_capability() == {capability.upper()!r}
torch.manual_seed(1234)
for threads in (1, 2):
    torch.set_num_threads(threads)
    for shape in SHAPES:
        x, weight, bias, residual = _operands(*shape)
        weight_t = winograd.transform_weight(weight)
        for relu in (False, True):
            _assert_close(torch.ops.fusedres.winograd_conv_act(x, weight_t, bias, residual, relu),
                          x, weight, bias, residual, relu)
            target = residual.clone()
            torch.ops.fusedres.winograd_conv_act_(target, x, weight_t, bias, relu)
            _assert_close(target, x, weight, bias, residual, relu)
print("ok")
""")
    assert out.strip().endswith("ok")


def test_in_place_overwrites_a_poisoned_residual_exactly_where_it_reads():
    # A residual of zeros except NaN in one pixel: exactly that pixel comes out NaN.
    x, weight, bias, _ = _operands(2, 5, 7, 5, 3)
    target = torch.zeros(2, 7, 5, 3).contiguous(memory_format=CL)
    target[1, :, 4, 2] = float("nan")
    torch.ops.fusedres.winograd_conv_act_(target, x, winograd.transform_weight(weight), bias, False)
    nan = target.isnan()
    assert nan[1, :, 4, 2].all() and nan.sum() == 7


def test_packed_winograd_matches_packed_conv():
    from fusedres.ops import onednn

    x, weight, bias, residual = _operands(2, 16, 24, 9, 10)
    args = ((1, 1), (1, 1), (1, 1), 1, x.shape, torch.float32)
    wino, direct = winograd.PackedWinograd(weight, bias, *args), onednn.PackedConv(weight, bias, *args)
    for relu in (False, True):
        _assert_close(wino(x, relu), x, weight, bias, None, relu)
    _assert_close(wino.add_relu(x, residual, inplace=False), x, weight, bias, residual, True)
    target = residual.clone()
    assert wino.add_relu(x, target, inplace=True) is target
    assert target._version == 1, "the in-place write did not bump the version counter"
    _assert_close(target, x, weight, bias, residual, True)
    torch.testing.assert_close(wino(x, True), direct(x, True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [5, 64, 130])
def test_transform_weight_in_float64_in_panels(k):
    weight = torch.randn(k, 3, 3, 3, dtype=torch.float64)
    u = winograd.transform_weight(weight)
    panels = -(-k // 64)
    assert u.shape == (4, 4, panels, 3, 64) and u.dtype == torch.float32 and u.is_contiguous()
    g = torch.tensor(winograd._G, dtype=torch.float64)
    expected = torch.einsum("ar,kcrs,bs->abck", g, weight, g).float()
    unpanelled = u.transpose(2, 3).reshape(4, 4, 3, panels * 64)
    assert torch.equal(unpanelled[..., :k], expected) and not unpanelled[..., k:].any()


def test_opcheck():
    x, weight, bias, residual = _operands(2, 5, 7, 5, 6)
    weight_t = winograd.transform_weight(weight)
    torch.library.opcheck(torch.ops.fusedres.winograd_conv_act.default, (x, weight_t, bias, residual, True))
    torch.library.opcheck(torch.ops.fusedres.winograd_conv_act.default, (x, weight_t, bias, None, False))
    torch.library.opcheck(torch.ops.fusedres.winograd_conv_act_.default, (residual.clone(), x, weight_t, bias, True))


@pytest.mark.parametrize("geometry, reason", [
    (((5, 5), (1, 1), (1, 1), (1, 1), 1, torch.float32), "3x3 kernels"),
    (((3, 3), (2, 2), (1, 1), (1, 1), 1, torch.float32), "stride 1"),
    (((3, 3), (1, 1), (2, 2), (2, 2), 1, torch.float32), "padding 1"),
    (((3, 3), (1, 1), (1, 1), (1, 1), 2, torch.float32), "groups=1"),
    (((3, 3), (1, 1), (1, 1), (1, 1), 1, torch.bfloat16), "float32"),
])
def test_unusable_reason(geometry, reason):
    assert reason in winograd.unusable_reason(*geometry, CPU)
    assert "CPU" in winograd.unusable_reason((3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, torch.device("meta"))
    with pytest.raises(ValueError, match=reason):
        kernel, stride, padding, dilation, groups, dtype = geometry
        winograd.PackedWinograd(torch.randn(4, 4 // groups, *kernel), torch.randn(4), stride, padding, dilation,
                                groups, (1, 4, 8, 8), dtype)


def _bad(**changes):
    x, weight, bias, residual = _operands(1, 4, 6, 5, 5)
    args = dict(x=x, weight_t=winograd.transform_weight(weight), bias=bias, residual=residual)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(x=torch.randn(1, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=CL)), "x must be float32"),
    (dict(x=torch.randn(1, 4, 5, 5)), "x must be channels_last"),
    (dict(x=torch.randn(4, 5, 5)), "x must be 4-D"),
    (dict(weight_t=torch.randn(6, 4, 3, 3)), r"weight_t must be the F\(2x2, 3x3\) transformed weight"),
    (dict(bias=torch.randn(70)), r"weight_t must be .* of shape \(4, 4, 2, C, 64\) for K=70"),
    (dict(weight_t=torch.randn(4, 4, 1, 3, 64)), "weight_t has 3 input channels but x has 4"),
    (dict(weight_t=torch.randn(4, 4, 1, 4, 64, dtype=torch.float64)), "weight_t must be float32"),
    (dict(bias=torch.randn(1, 6)), r"bias must have shape \(K,\)"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), "bias must be float32"),
    (dict(residual=torch.randn(1, 6, 4, 5).contiguous(memory_format=CL)), "residual must have the output's shape"),
    (dict(residual=torch.randn(1, 6, 5, 5)), "residual must be channels_last"),
])
def test_bad_operands_name_the_argument(changes, message):
    args = _bad(**changes)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fusedres.winograd_conv_act(args["x"], args["weight_t"], args["bias"], args["residual"], True)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fusedres.winograd_conv_act_(args["residual"], args["x"], args["weight_t"], args["bias"], True)


def test_in_place_refuses_a_residual_that_is_x():
    x, weight, bias, _ = _operands(1, 4, 4, 5, 5)
    with pytest.raises(RuntimeError, match="must not share memory with x"):
        torch.ops.fusedres.winograd_conv_act_(x, x, winograd.transform_weight(weight), bias, True)


def test_transform_weight_refuses_other_kernel_sizes():
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\)"):
        winograd.transform_weight(torch.randn(4, 4, 5, 5))
