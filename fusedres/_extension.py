"""Loads the compiled extension ``fusedres._C`` if it was built; the package works without it."""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from fusedres import _C  # noqa: F401  (registers the torch.ops.fusedres schemas and kernels)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "fusedres._C could not be loaded, so the 'cuda' backend (C++ CPU and CUDA kernels) is "
        f"unavailable; the 'triton' and 'reference' backends still work. Reason: {LOAD_ERROR}. "
        "Run `python -m fusedres info` for details.",
        stacklevel=2,
    )


def loaded() -> bool:
    """True when the C++ ops (and their CPU kernels) are registered."""
    return _C is not None


def with_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.with_cuda)
