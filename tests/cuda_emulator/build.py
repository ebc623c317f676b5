"""Compile this checkout's CUDA kernels (csrc/**/*_cuda.cu) with the host compiler against the
emulator, into a shared library for ctypes. Cached under build/cuda_emulator/ by the sha256 of
every source and header involved, the compiler and the flags: an edit anywhere rebuilds it.

Run as a script to build (and time) a variant: ``python -m tests.cuda_emulator.build [asan]``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "cuda_emulator"
LIBRARY = "libfusedres_cuda_emu.so"
SHARED_TABLE = "shared_variables.txt"

COMMON_FLAGS = ["-std=c++20", "-fPIC", "-DFUSEDRES_CUDA_EMULATOR", "-Wall", "-Wno-unknown-pragmas"]
VARIANT_FLAGS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all"],
}
TOOLKIT_HEADERS = ["cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp", "cuda_runtime_api.h",
                   "vector_types.h", "crt/host_defines.h"]


def cuda_include() -> Path | None:
    """The toolkit's include directory (cuda_fp16.h and friends), or None without a toolkit."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    return None


def kernel_sources() -> list[Path]:
    return sorted(CSRC.rglob("*_cuda.cu"))


def _inputs(include: Path) -> list[Path]:
    files = set(kernel_sources())
    for pattern in ("*.cuh", "*.h"):
        files.update(CSRC.rglob(pattern))
    files.update(p for p in HERE.rglob("*") if p.suffix in (".h", ".cpp") and p.is_file())
    files.add(HERE / "build.py")
    return sorted(files) + [include / h for h in TOOLKIT_HEADERS]


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _key(variant: str, include: Path) -> str:
    h = hashlib.sha256()
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    h.update(version.encode())
    h.update(repr((COMMON_FLAGS, VARIANT_FLAGS[variant], str(include))).encode())
    for path in _inputs(include):
        h.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def build(variant: str = "plain", verbose: bool = False) -> Path:
    """Path of the library for ``variant`` ("plain" or "asan"), compiled if not cached."""
    include = cuda_include()
    if include is None:
        raise FileNotFoundError("no CUDA toolkit headers (cuda_fp16.h): set CUDA_HOME")
    out_dir = CACHE / f"{variant}-{_key(variant, include)}"
    lib = out_dir / LIBRARY
    if lib.is_file():
        return lib
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_file():
            return lib
        flags = COMMON_FLAGS + VARIANT_FLAGS[variant] + [
            "-include", "cuda_runtime.h",  # before the toolkit's headers (see include/cuda_runtime.h)
            f"-I{HERE / 'include'}", f"-I{CSRC}", f"-I{CSRC / 'include'}", f"-I{include}",
        ]
        # The kernels first: their function-local statics are the __shared__ variables.
        sources = [(src, ["-x", "c++"]) for src in kernel_sources()]
        sources += [(HERE / "selftest_kernels.cpp", []), (HERE / "runtime.cpp", []), (HERE / "driver.cpp", [])]
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=f"{variant}-tmp-"))
        try:
            start = time.perf_counter()

            def compile_one(item: tuple[Path, list[str]]) -> Path:
                src, lang = item
                obj = tmp / (src.name + ".o")
                cmd = [_compiler(), *flags, *lang, "-c", str(src), "-o", str(obj)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{done.stderr}")
                return obj

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                objects = list(pool.map(compile_one, sources))
            link = [_compiler(), "-shared", "-Wl,-Bsymbolic", *VARIANT_FLAGS[variant], "-o", str(tmp / LIBRARY),
                    *map(str, objects)]
            done = subprocess.run(link, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"emulator link failed: {' '.join(link)}\n{done.stderr}")
            _write_shared_table(objects[: len(kernel_sources()) + 1], tmp / LIBRARY, tmp / SHARED_TABLE)
            for obj in objects:
                obj.unlink()
            if verbose:
                print(f"built {variant} emulator in {time.perf_counter() - start:.1f} s: {out_dir}")
            os.replace(tmp, out_dir)
            for stale in CACHE.glob(f"{variant}-*"):  # earlier sources' builds
                if stale != out_dir and not stale.name.startswith(f"{variant}-tmp-"):
                    shutil.rmtree(stale, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return lib


def _is_library(symbol: str) -> bool:
    return symbol.startswith(("_ZZNSt", "_ZZSt", "_ZZNKSt", "_ZZN9__gnu_cxx"))


def _local_statics(binary: Path) -> list[tuple[str, str, str]]:
    """(value, size, symbol) of the function-local statics (``_ZZ...``) defined in ``binary``."""
    out = subprocess.run(["nm", "--defined-only", "-S", str(binary)], capture_output=True, text=True, check=True)
    rows = []
    for line in out.stdout.splitlines():
        parts = line.split()
        # b/d: local (anonymous namespace), u: unique global (template instantiations)
        if len(parts) == 4 and parts[2] in "bBdDu" and parts[3].startswith("_ZZ") and not _is_library(parts[3]):
            rows.append((parts[0], parts[1], parts[3]))
    return rows


def _write_shared_table(kernel_objects: list[Path], lib: Path, table: Path) -> None:
    """The __shared__ variables: every function-local static of the kernel sources (CUDA code
    here has no other), located in the linked library for the runtime to poison and bound."""
    names = {sym for obj in kernel_objects for _, _, sym in _local_statics(obj)}
    rows = [row for row in _local_statics(lib) if row[2] in names]
    table.write_text("".join(f"{value} {size} {sym}\n" for value, size, sym in rows))


def sanitizer_preload() -> str:
    """LD_PRELOAD for a process that loads the asan variant (python itself is not instrumented)."""
    out = subprocess.run([_compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "plain", verbose=True))
