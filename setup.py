"""Builds fusedres._C: the C++ ops with CPU kernels always, the CUDA kernels when a toolkit is found.

Environment:
  FUSEDRES_BUILD_CUDA=1/0   force the CUDA kernels on or off (default: on when nvcc is found)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0": A100 and H100)
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cuda_toolkit_problem() -> str | None:
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (no nvcc on PATH and CUDA_HOME unset)"
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit root)"
    return None


def want_cuda() -> bool:
    # Never ask torch.cuda.is_available(): a GPU-less build machine must still build the kernels.
    forced = os.environ.get("FUSEDRES_BUILD_CUDA")
    if forced not in (None, "0", "1"):
        raise SystemExit(f"FUSEDRES_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    problem = cuda_toolkit_problem()
    if problem is None:
        return True
    if forced == "1":
        raise SystemExit(f"FUSEDRES_BUILD_CUDA=1 but {problem}")
    print(f"fusedres: building without the CUDA kernels: {problem}")
    return False


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extension():
    with_cuda = want_cuda()
    cpp_sources = [s for s in sources("csrc/**/*.cpp") if not s.endswith("_cuda_glue.cpp")]
    openmp = "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]
    # ATen's parallel_for is inline OpenMP: without -fopenmp the CPU kernels run on one thread.
    cxx_flags = ["-O3", f"-DFUSEDRES_WITH_CUDA={int(with_cuda)}"] + (["-fopenmp"] if openmp else [])
    link_flags = ["-fopenmp"] if openmp else []
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if not with_cuda:
        return CppExtension(
            "fusedres._C", cpp_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc_flags = [
        "-O3",
        "--expt-relaxed-constexpr",
        # torch defines these to keep its own headers honest; our .cu files include no torch
        # header and use the cuda_fp16/cuda_bf16 operators directly.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return CUDAExtension(
        "fusedres._C",
        cpp_sources + sources("csrc/**/*_cuda_glue.cpp") + sources("csrc/**/*.cu"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
