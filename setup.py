"""Builds fusedres._C (the C++ ops: CPU kernels always, CUDA kernels when a CUDA toolkit is found)
and, with CUDA and the cudnn-frontend headers, fusedres._cudnn_C (the `cudnn` backend).

Environment:
  FUSEDRES_BUILD_CUDA=1/0   force the CUDA kernels on or off (default: on when a toolkit is found);
                            1 fails the build when the toolkit is missing
  FUSEDRES_BUILD_CUDNN=1/0  force the cuDNN backend on or off (default: on with the CUDA kernels
                            when the cudnn-frontend headers are installed); 1 fails the build
                            without them
  CUDA_HOME                 the CUDA toolkit (default: /usr/local/cuda, else the toolkit of the nvcc
                            on PATH)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0": A100 and H100)
  MAX_JOBS                  parallel compile jobs (ninja)

Building without CUDA (or without the cuDNN backend) is reported on stderr and recorded in the
generated fusedres/_build_info.py, which `python -m fusedres info` shows (pip hides the output).
"""

import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"
BUILD_INFO = ROOT / "fusedres" / "_build_info.py"


def _has_cuda_headers(root: Path) -> bool:
    return (root / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> tuple[Path | None, str]:
    """(toolkit root, None when there is none; what was found or why not).

    torch guesses CUDA_HOME from `which nvcc` (here /usr/local/bin/nvcc -> /usr/local, which has no
    headers), so the toolkit is looked up here: CUDA_HOME/CUDA_PATH, /usr/local/cuda, then the
    directory holding include/cuda_runtime.h beside the nvcc on PATH (symlinks resolved).
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        root = Path(explicit)
        if _has_cuda_headers(root):
            return root, f"CUDA_HOME={root}"
        return None, f"CUDA_HOME={root} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit root)"
    if _has_cuda_headers(Path("/usr/local/cuda")):
        return Path("/usr/local/cuda"), "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "no CUDA toolkit found (CUDA_HOME unset, no /usr/local/cuda, no nvcc on PATH)"
    roots = [Path(nvcc).parent.parent, Path(nvcc).resolve().parent.parent]
    # nvcc may be a wrapper script (here: /usr/local/bin/nvcc exec's the real one): its dry run
    # names the toolkit (#$ TOP=<toolkit>/bin/..).
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=30)
        roots += [Path(line.split("=", 1)[1]).resolve() for line in (dry.stdout + dry.stderr).splitlines()
                  if line.startswith("#$ TOP=")]
    except (OSError, subprocess.SubprocessError):
        pass
    for root in roots:
        if _has_cuda_headers(root):
            return root, f"the toolkit of {nvcc}"
    return None, f"nvcc is at {nvcc} but no include/cuda_runtime.h is beside it (set CUDA_HOME)"


CUDA_ROOT, CUDA_FOUND = find_cuda_home()
if CUDA_ROOT is not None:
    # Read by torch.utils.cpp_extension when it is imported (below): build with this toolkit.
    os.environ["CUDA_HOME"] = str(CUDA_ROOT)

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def wheel_header(name: str, distribution_prefix: str) -> Path | None:
    """`include/<name>` shipped by an installed wheel whose name starts with `distribution_prefix`."""
    for dist in importlib.metadata.distributions():
        dist_name = (dist.metadata["Name"] or "").lower()
        if not dist_name.startswith(distribution_prefix):
            continue
        for f in dist.files or ():
            if f.name == name and f.parent.name == "include":
                path = Path(dist.locate_file(f))
                if path.is_file():
                    return path.parent
    return None


def cuda_problem() -> str | None:
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if CUDA_ROOT is None:
        return CUDA_FOUND
    return None


def want_cuda() -> tuple[bool, str]:
    """(build the CUDA kernels?, why not). Never asks torch.cuda.is_available(): a GPU-less build
    machine must still build them."""
    forced = os.environ.get("FUSEDRES_BUILD_CUDA")
    if forced not in (None, "0", "1"):
        raise SystemExit(f"FUSEDRES_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "FUSEDRES_BUILD_CUDA=0"
    problem = cuda_problem()
    if problem is None:
        return True, ""
    if forced == "1":
        raise SystemExit(f"FUSEDRES_BUILD_CUDA=1 but {problem}")
    return False, problem


def cudnn_include_dirs() -> tuple[list[Path], str]:
    """Include directories of the cuDNN backend (cudnn_frontend.h, cudnn.h, nvrtc.h), or why not."""
    frontend = wheel_header("cudnn_frontend.h", "nvidia-cudnn-frontend")
    if frontend is None:
        return [], "the cudnn-frontend headers are not installed (pip install nvidia-cudnn-frontend)"
    dirs = [frontend]
    for header, wheel in (("cudnn.h", "nvidia-cudnn"), ("nvrtc.h", "nvidia-")):
        if (CUDA_ROOT / "include" / header).is_file():
            continue
        found = wheel_header(header, wheel)
        if found is None:
            return [], f"{header} is in neither {CUDA_ROOT}/include nor an installed nvidia wheel"
        dirs.append(found)
    return dirs, ""


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern), recursive=True))


def extensions() -> tuple[list, str, str]:
    """(the extensions, why no CUDA kernels, why no cuDNN backend)."""
    with_cuda, cuda_note = want_cuda()
    # csrc/cudnn/ is the separate _cudnn_C (other flags; the frontend must stay out of _C).
    cpp_sources = [s for s in sources("csrc/**/*.cpp")
                   if not s.endswith("_cuda_glue.cpp") and not s.startswith("csrc/cudnn/")]
    openmp = "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]
    # ATen's parallel_for is inline OpenMP: without -fopenmp the CPU kernels run on one thread.
    cxx_flags = ["-O3", f"-DFUSEDRES_WITH_CUDA={int(with_cuda)}"] + (["-fopenmp"] if openmp else [])
    link_flags = ["-fopenmp"] if openmp else []
    include_dirs = [str(ROOT / "csrc"), str(ROOT / "csrc" / "include")]
    if not with_cuda:
        ext = CppExtension("fusedres._C", cpp_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
        return [ext], cuda_note, f"no CUDA kernels ({cuda_note})"
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
    # CUDAExtension appends torch's include paths to the list it is given: one copy each.
    exts = [CUDAExtension(
        "fusedres._C",
        cpp_sources + sources("csrc/**/*_cuda_glue.cpp") + sources("csrc/**/*.cu"),
        include_dirs=list(include_dirs),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )]
    forced = os.environ.get("FUSEDRES_BUILD_CUDNN")
    if forced not in (None, "0", "1"):
        raise SystemExit(f"FUSEDRES_BUILD_CUDNN must be 0 or 1, got {forced!r}")
    if forced == "0":
        return exts, "", "FUSEDRES_BUILD_CUDNN=0"
    cudnn_dirs, cudnn_note = cudnn_include_dirs()
    if not cudnn_dirs:
        if forced == "1":
            raise SystemExit(f"FUSEDRES_BUILD_CUDNN=1 but {cudnn_note}")
        return exts, "", cudnn_note
    # The frontend is host code (-O1: 76 s and 1.8 GB instead of 89 s and 2.2 GB at -O2). It
    # loads the libcudnn torch loaded (dlopen): the extension links no cuDNN, only -ldl.
    cudnn_flags = ["-O1", "-std=c++20", "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING"]
    for d in cudnn_dirs:
        cudnn_flags += ["-isystem", str(d)]  # the frontend's headers warn under -Wextra
    exts.append(CUDAExtension(
        "fusedres._cudnn_C",
        sources("csrc/cudnn/*.cpp"),
        include_dirs=list(include_dirs),
        extra_compile_args={"cxx": cudnn_flags, "nvcc": []},
        extra_link_args=["-ldl"],
    ))
    return exts, "", ""


class Build(BuildExtension):
    """BuildExtension that records what was left out (and why) in fusedres/_build_info.py."""

    def run(self):
        # In place (develop/editable builds) beside the sources, else into the wheel's tree.
        target = BUILD_INFO if self.inplace else Path(self.build_lib) / "fusedres" / BUILD_INFO.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            '"""Written by setup.py at build time: what the build left out and why (empty: nothing)."""\n\n'
            f"CUDA_NOTE = {CUDA_NOTE!r}\nCUDNN_NOTE = {CUDNN_NOTE!r}\n")
        for what, note in (("the CUDA kernels", CUDA_NOTE), ("the cuDNN backend (fusedres._cudnn_C)", CUDNN_NOTE)):
            if note:
                print(f"\n*** fusedres: building WITHOUT {what}: {note} ***\n", file=sys.stderr)
        super().run()


EXTENSIONS, CUDA_NOTE, CUDNN_NOTE = extensions()

setup(
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
