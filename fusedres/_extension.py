"""Loads the compiled extension ``fusedres._C`` if it was built; the package works without it.

When it cannot be loaded, ``LOAD_ERROR`` says what happened and ``REMEDY`` what to run. The
common case is a source checkout: ``pip install .`` builds ``_C`` into site-packages, but Python
run from the clone imports the clone's ``fusedres/`` (the current directory comes first on
``sys.path``), where nothing was built.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import warnings
from pathlib import Path

import torch  # loads libtorch, which _C links against

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_COMMAND = "pip install --no-build-isolation -e ."


def built_files(package_dir: Path) -> list[Path]:
    """The compiled ``_C`` files in a ``fusedres`` package directory."""
    return sorted(p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in package_dir.glob(f"_C{suffix}"))


def _installed_elsewhere() -> Path | None:
    """Another ``fusedres`` on ``sys.path`` (e.g. site-packages after ``pip install .``) that has
    ``_C`` built, which this one shadows."""
    for entry in sys.path:
        candidate = (Path(entry or ".") / "fusedres").resolve()
        if candidate != PACKAGE_DIR and built_files(candidate):
            return candidate
    return None


def _load() -> tuple[object | None, str | None, str | None]:
    """(the module or None, what went wrong, what to run)."""
    files = built_files(PACKAGE_DIR)
    checkout = (PACKAGE_DIR.parent / "setup.py").is_file()
    if not files:
        where = f"the source checkout {PACKAGE_DIR.parent}" if checkout else str(PACKAGE_DIR)
        other = _installed_elsewhere()
        if other is not None:
            why = ("because Python puts the current directory first on sys.path"
                   if PACKAGE_DIR.parent == Path.cwd().resolve() else "because it comes first on sys.path")
            return (None, f"fusedres was imported from {where}, where the extension is not built; the installed "
                          f"fusedres in {other}, which has it, is shadowed {why}",
                    f"run from another directory, or build the extension in the checkout with `{BUILD_COMMAND}`")
        return (None, f"the extension is not built in {where}",
                f"build it from the clone with `{BUILD_COMMAND}` (README.md, Set up)")
    try:
        # import_module, not `from fusedres import _C`: during the package's own import the latter
        # turns any failure into a misleading "partially initialized module (circular import)".
        return importlib.import_module("fusedres._C"), None, None
    except ImportError as exc:
        return (None, f"{files[0]} failed to load ({type(exc).__name__}: {exc})",
                f"it was most likely built against another torch than this {torch.__version__}: rebuild it "
                f"against this one with `{BUILD_COMMAND}` (--no-build-isolation builds against the installed torch)")


_C, LOAD_ERROR, REMEDY = _load()
if _C is None:
    warnings.warn(
        f"fusedres._C could not be loaded: {LOAD_ERROR}. The 'native' backend (its C++ CPU and CUDA kernels) is "
        f"unavailable; 'triton' and 'reference' still work. To fix: {REMEDY}.",
        stacklevel=2,
    )


def loaded() -> bool:
    """True when the C++ ops (and their CPU kernels) are registered."""
    return _C is not None


def location() -> Path | None:
    """The loaded ``_C`` file."""
    return None if _C is None else Path(_C.__file__)


def with_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.with_cuda)


def cuda_build_note() -> str:
    """Why the build left the CUDA kernels out, as setup.py recorded it (or a generic reason)."""
    try:
        from fusedres import _build_info
    except ImportError:
        return "the build found no usable CUDA toolkit; rebuild with FUSEDRES_BUILD_CUDA=1 to see why"
    return getattr(_build_info, "CUDA_NOTE", "") or "built without CUDA"
