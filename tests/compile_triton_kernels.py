"""Compiles the Triton conv kernels for sm_90 with Triton's own compiler and ptxas; no GPU needed.

    python -m tests.compile_triton_kernels      (with TRITON_INTERPRET unset)

CI runs the Triton kernels under the interpreter, which accepts things the GPU compiler rejects
(loop bounds read from memory, dtype mixes in tl.dot, shared memory past the SM's). This builds
every conv kernel, with all its prologues and epilogues on and with them off, in bf16 and in fp32
(TF32) with the largest tile config the autotuner tries, and prints what came out: the MMA
instructions of the PTX and the shared memory (a config over the SM's limit is skipped by the
autotuner at launch, so it is reported, not failed). Exit status 1 if any variant fails.
"""

from __future__ import annotations

import inspect
import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_PER_BLOCK = 227 * 1024  # H100's opt-in maximum
# Pointers to fp32 per-channel vectors, partials and workspaces, and the int32 tap table; any
# other pointer is an activation or weight in the storage dtype.
FP32_POINTERS = {"scale_ptr", "shift_ptr", "scale_in_ptr", "shift_in_ptr", "coef_ptr", "mean_in_ptr", "invstd_in_ptr",
                 "part_mean_ptr", "part_m2_ptr", "part_g_ptr", "part_gx_ptr", "ws_ptr"}
INT32_POINTERS = {"tap_count_ptr", "tap_table_ptr"}
FLAGS = ("HAS_SCALE", "HAS_SHIFT", "HAS_RESIDUAL", "RELU", "HAS_PROLOGUE", "HAS_COEF")


def kernels():
    from fusedres.triton import conv_bn_act, conv_bn_backward, conv_bn_stats

    return {
        "conv_bn_act": conv_bn_act._conv_bn_act_kernel,
        "conv_bn_stats": conv_bn_stats._conv_bn_stats_kernel,
        "conv_bn_backward.dgrad": conv_bn_backward._dgrad_kernel,
        "conv_bn_backward.wgrad": conv_bn_backward._wgrad_kernel,
    }


def compile_variant(autotuned, dtype: str, flags_on: bool):
    jit = autotuned.fn  # the @triton.jit function under @triton.autotune
    config = autotuned.configs[0]  # the largest tile
    params = list(inspect.signature(jit.fn).parameters)
    constexprs = {name: flags_on for name in FLAGS if name in params}
    constexprs.update(R=3, S=3, INPUT_PRECISION="tf32", ACC_DTYPE=tl.float32, INTERPRET=False, **config.kwargs)
    signature = {}
    for name in params:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_POINTERS else "*i32" if name in INT32_POINTERS else f"*{dtype}"
        else:
            signature[name] = "i64"
    source = ASTSource(fn=jit, signature=signature, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=TARGET, options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    failures = 0
    for name, kernel in kernels().items():
        for dtype in ("bf16", "fp32"):
            for flags_on in (True, False):
                label = f"{name} {dtype} {'all fusions' if flags_on else 'no fusions'}"
                try:
                    compiled = compile_variant(kernel, dtype, flags_on)
                except Exception as error:  # report every variant, then fail
                    failures += 1
                    print(f"FAIL {label}: {type(error).__name__}: {str(error)[:400]}")
                    continue
                ptx = compiled.asm["ptx"]
                mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
                shared = compiled.metadata.shared
                # Too much shared memory is no failure: the autotuner skips the config at launch.
                note = " (over the SM's 227 KB: the autotuner skips this config)" if shared > SHARED_MEMORY_PER_BLOCK else ""
                print(f"ok   {label}: {mma}, {shared} B shared memory{note}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
