"""The CUDA emulator catches what it is for: seeded bugs in small kernels
(tests/cuda_emulator/selftest_kernels.cpp) fail loudly, naming kernel, block and thread, and the
correct twins pass; WMMA and tf32 rounding match the hardware's arithmetic."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cuda_emulator import build
from tests.cuda_emulator.emulator import Emulator, KernelFailure, ptr

pytestmark = pytest.mark.emulated


@pytest.fixture(scope="module")
def emu() -> Emulator:
    if build.cuda_include() is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) to build the emulator against")
    return Emulator()


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_missing_barrier_is_a_race_some_order_exposes(emu, order):
    emu.configure(order, seed=7)
    want = torch.tensor([(t + 1) % 64 for t in range(64)], dtype=torch.float32)
    out = torch.full((64,), float("nan"))
    emu.run("emu_selftest_neighbour", 1, ptr(out))
    assert torch.equal(out, want)
    out.fill_(float("nan"))
    emu.run("emu_selftest_neighbour", 0, ptr(out))
    # Forward order runs each thread to its end before the next writes: the read sees poison.
    if order != "reverse":
        assert not torch.equal(out, want), "the race went unseen"


def test_exit_before_barrier_fails(emu):
    emu.configure("forward")
    out = torch.zeros(32)
    with pytest.raises(KernelFailure, match=r"early_exit_kernel.*block \(0,0,0\).*__syncthreads.*exited.*\(5,0,0\)"):
        emu.run("emu_selftest_early_exit", ptr(out))


def test_threads_at_different_barriers_fail(emu):
    emu.configure("reverse")
    out = torch.zeros(32)
    with pytest.raises(KernelFailure, match=r"divergent_barrier_kernel.*waits at __syncthreads .*selftest_kernels.cpp:\d+"):
        emu.run("emu_selftest_divergent_barrier", ptr(out))


def _wmma(emu, offset, ldm, skip_lane=-1):
    a, b = torch.randn(16, 16).half(), torch.randn(16, 16).half()
    c = torch.full((16, 16), float("nan"))
    emu.run("emu_selftest_wmma", ptr(a), ptr(b), ptr(c), offset, ldm, skip_lane)
    return c, a.float() @ b.float()


def test_wmma_fp16_matches_matmul(emu):
    emu.configure("random", seed=3)
    c, want = _wmma(emu, 0, 24)
    torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "offset, ldm, problem",
    [(8, 24, "pointer is not 256-bit aligned"), (0, 20, "ldm is not a multiple of 16 bytes"),
     (32, 24, "tile runs past the end of its shared variable")],
)
def test_wmma_breaking_hardware_rules_fails(emu, offset, ldm, problem):
    emu.configure("forward")
    with pytest.raises(KernelFailure, match=rf"wmma_kernel.*thread \(0,0,0\).*load_matrix_sync: {problem}"):
        _wmma(emu, offset, ldm)


def test_wmma_divergent_lane_fails(emu):
    emu.configure("forward")
    with pytest.raises(KernelFailure, match=r"wmma_kernel.*lanes 0 and 3 of warp 0 issued different WMMA"):
        _wmma(emu, 0, 24, skip_lane=3)


def _bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _rna_tf32(v: float) -> float:
    """cvt.rna.tf32.f32 in Python: round the low 13 bits to nearest, ties away from zero."""
    u = _bits(v)
    u = (u + 0x1000) & 0xFFFFE000
    return struct.unpack("<f", struct.pack("<I", u))[0]


def test_tf32_rounding_and_mma(emu):
    emu.configure("forward")
    # Ties (exactly half of the dropped bits) round away from zero, unlike round-to-nearest-even.
    ties = [struct.unpack("<f", struct.pack("<I", b))[0] for b in (0x3F801000, 0xBF801000, 0x3F803000, 0x3F800FFF)]
    a = torch.randn(16 * 8)
    a[: len(ties)] = torch.tensor(ties)
    b = torch.randn(8 * 16)
    rounded = torch.full((16 * 8,), float("nan"))
    c = torch.full((16, 16), float("nan"))
    emu.run("emu_selftest_tf32", ptr(a), ptr(b), ptr(c), ptr(rounded), a.numel(), 1)
    assert [_bits(v) for v in rounded.tolist()] == [_bits(_rna_tf32(v)) for v in a.tolist()]
    assert [_bits(v) for v in rounded[:4].tolist()] == [0x3F802000, 0xBF802000, 0x3F804000, 0x3F800000]
    ra = torch.tensor([_rna_tf32(v) for v in a.tolist()]).double().view(16, 8)
    rb = torch.tensor([_rna_tf32(v) for v in b.tolist()]).double().view(8, 16)
    torch.testing.assert_close(c.double(), ra @ rb, rtol=1e-6, atol=1e-6)
    # Unrounded operands: the tensor cores read only the tf32 bits (truncation).
    emu.run("emu_selftest_tf32", ptr(a), ptr(b), ptr(c), ptr(rounded), a.numel(), 0)
    ta = torch.tensor([struct.unpack("<f", struct.pack("<I", _bits(v) & 0xFFFFE000))[0] for v in a.tolist()])
    tb = torch.tensor([struct.unpack("<f", struct.pack("<I", _bits(v) & 0xFFFFE000))[0] for v in b.tolist()])
    torch.testing.assert_close(c.double(), ta.double().view(16, 8) @ tb.double().view(8, 16), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_shuffles(emu, order):
    emu.configure(order, seed=11)
    x = torch.randn(32)
    out = torch.full((64,), float("nan"))
    emu.run("emu_selftest_shuffle", ptr(x), ptr(out), -1)
    torch.testing.assert_close(out[:32], x.sum().expand(32), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[32:63], x[1:]) and out[63] == x[31]


def test_shuffle_with_an_exited_lane_fails(emu):
    emu.configure("forward")
    x = torch.randn(32)
    out = torch.zeros(64)
    with pytest.raises(KernelFailure, match=r"shuffle_kernel.*warp op waits for lane 7, which has exited"):
        emu.run("emu_selftest_shuffle", ptr(x), ptr(out), 7)


# UBSan's bounds check sees the shared array's type before ASan's redzone is reached.
@pytest.mark.parametrize("memory, report", [("global", "heap-buffer-overflow"), ("shared", "index 48 out of bounds")])
def test_sanitizer_build_catches_missing_bound_checks(emu, memory, report):
    """A kernel storing past its buffer (torch's allocation, or a __shared__ array) stops the
    ASan+UBSan build with the report and the kernel's frame."""
    build.build("asan")
    code = (
        "import torch\n"
        "from tests.cuda_emulator.emulator import Emulator, ptr\n"
        "out = torch.zeros(48)\n"
        f"Emulator('asan').run('emu_selftest_unchecked', {int(memory == 'shared')}, ptr(out), 48)\n"
    )
    env = dict(os.environ, LD_PRELOAD=build.sanitizer_preload(), ASAN_OPTIONS="detect_leaks=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode != 0 and report in done.stderr, done.stderr[-3000:]
    assert "unchecked_" in done.stderr
