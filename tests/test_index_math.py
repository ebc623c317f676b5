"""The CUDA kernels' index helpers (csrc/include/fusedres/conv_geometry.h) against Python's exact
integers, for shapes past 2^31 elements that are never allocated."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedres
from tests.conftest import fused_backends

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the index probe")
    exe = tmp_path_factory.mktemp("probe") / "conv_geometry_probe"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "cpp" / "conv_geometry_probe.cpp"), "-o", str(exe)], check=True)
    return exe


def expected(n, h, w, c, k, r, s, sh, sw, ph, pw, dh, dw, groups, m, kd, kk):
    p = (h + 2 * ph - dh * (r - 1) - 1) // sh + 1
    q = (w + 2 * pw - dw * (s - 1) - 1) // sw + 1
    cg, kg = c // groups, k // groups
    pn, rem = divmod(m, p * q)
    pp, pq = divmod(rem, q)
    tr, rem = divmod(kd, s * cg)
    ts, tc = divmod(rem, cg)
    hh, ww = pp * sh - ph + tr * dh, pq * sw - pw + ts * dw
    offset = -1 if not (0 <= hh < h and 0 <= ww < w) else ((pn * h + hh) * w + ww) * c + (kk // kg) * cg + tc
    return [n * p * q, pn, pp, pq, tr, ts, tc, offset, kk * r * s * cg + kd]


CASES = {
    # 64 x 512 x 512 x 1024 input: 2^34 elements; the last pixel, the last tap.
    "input_past_2^34": (64, 512, 512, 1024, 256, 3, 3, 1, 1, 1, 1, 1, 1, 1, 64 * 512 * 512 - 1, 9 * 1024 - 1, 255),
    # output rows past 2^31 (M = N*P*Q) with stride 2 and groups.
    "rows_past_2^31": (9000, 1024, 1024, 64, 128, 3, 3, 2, 2, 1, 1, 1, 1, 4, 9000 * 512 * 512 - 7, 5 * 16 + 3, 127),
    # a tap in the padding gives -1.
    "padding_tap": (2, 7, 7, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    "dilated_grouped": (3, 13, 11, 12, 6, 3, 3, 1, 2, 2, 2, 2, 2, 3, 100, 17, 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_index_helpers_use_64bit_math(probe, case):
    args = CASES[case]
    out = subprocess.run([str(probe), *map(str, args)], capture_output=True, text=True, check=True).stdout
    assert list(map(int, out.split())) == expected(*args)


@pytest.mark.parametrize("backend", [b for b in fused_backends("cpu")])
def test_public_op_takes_shapes_past_2_31_through_fake_impls(backend):
    with FakeTensorMode():
        x = torch.empty(64, 1024, 512, 512).to(memory_format=torch.channels_last)
        w = torch.empty(256, 1024, 3, 3)
        out = fusedres.conv_bn_act(x, w, padding=1, backend=backend)
    assert out.shape == (64, 256, 512, 512) and out.numel() > 2**31
