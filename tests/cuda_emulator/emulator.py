"""ctypes front end of the CUDA emulator: the launchers of csrc/**/*_cuda.cu on CPU tensors."""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from tests.cuda_emulator import build

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # fusedres::cuda::DType
ORDERS = {"forward": 0, "reverse": 1, "random": 2}

# Argument kinds of the driver's entry points (driver.cpp): p pointer, i int, l int64, f float.
_SIGNATURES = {
    "emu_conv_bn_act": "pi" + "p" * 7 + "ii",
    "emu_conv_bn_stats_num_partials": "p",
    "emu_conv_bn_stats": "pi" + "p" * 8 + "i",
    "emu_bn_finalize": "ll" + "p" * 6 + "iff" + "ppp",
    "emu_bn_add_act": "lli" + "p" * 8 + "i",
    "emu_bn_act_backward_num_partials": "l",
    "emu_bn_act_backward": "lli" + "p" * 6 + "i",
    "emu_bn_backward_num_partials": "l",
    "emu_bn_backward_reduce": "lli" + "p" * 10,
    "emu_bn_backward_elemt": "lli" + "p" * 7 + "l" + "p" * 4,
    "emu_conv_bn_backward_workspace_floats": "pii",
    "emu_conv_bn_backward": "pi" + "p" * 14 + "i",
    # selftest_kernels.cpp
    "emu_selftest_neighbour": "ip",
    "emu_selftest_early_exit": "p",
    "emu_selftest_divergent_barrier": "p",
    "emu_selftest_wmma": "pppiii",
    "emu_selftest_tf32": "ppppii",
    "emu_selftest_shuffle": "ppi",
    "emu_selftest_unchecked": "ipi",
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_int64, "f": ctypes.c_float}


class KernelFailure(RuntimeError):
    """A launch the emulator stopped (divergent barrier, misaligned fragment, ...) or refused."""


def ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def int64s(values) -> ctypes.Array:
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


class Emulator:
    def __init__(self, variant: str = "plain") -> None:
        self.path = build.build(variant)
        self.lib = ctypes.CDLL(str(self.path))
        for name, kinds in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes = [_CTYPES[k] for k in kinds]
            fn.restype = ctypes.c_int64 if name.endswith(("_partials", "_floats")) else ctypes.c_int
        self.lib.fusedres_emu_configure.argtypes = [ctypes.c_int, ctypes.c_uint64]
        self.lib.fusedres_emu_error.restype = ctypes.c_char_p
        self.lib.fusedres_emu_kernels.restype = ctypes.c_char_p
        self.lib.fusedres_emu_kernels.argtypes = [ctypes.c_int]
        self.lib.fusedres_emu_load_shared_table.argtypes = [ctypes.c_char_p]
        table = self.path.parent / build.SHARED_TABLE
        self.shared_variables = self.lib.fusedres_emu_load_shared_table(str(table).encode())
        if self.shared_variables <= 0:
            raise RuntimeError(f"no __shared__ variables read from {table}")

    def configure(self, order: str, seed: int = 0) -> None:
        self.lib.fusedres_emu_configure(ORDERS[order], seed)

    def size(self, name: str, *args) -> int:
        return getattr(self.lib, name)(*args)

    def run(self, name: str, *args) -> None:
        """Calls a launcher; raises KernelFailure with the emulator's message if it fails."""
        self.lib.fusedres_emu_clear()
        status = getattr(self.lib, name)(*args)
        if status != 0:
            message = self.lib.fusedres_emu_error().decode() or "(no kernel failure recorded)"
            self.lib.fusedres_emu_clear()
            raise KernelFailure(f"{name}: cudaError_t {status}: {message}")

    def registered(self) -> set[str]:
        """Every kernel instantiation some launcher can reach."""
        return set(self.lib.fusedres_emu_kernels(0).decode().splitlines())

    def launched(self) -> dict[str, int]:
        out = {}
        for line in self.lib.fusedres_emu_kernels(1).decode().splitlines():
            count, name = line.split("\t", 1)
            out[name] = int(count)
        return out
