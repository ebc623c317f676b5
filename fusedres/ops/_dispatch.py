"""Maps a concrete backend to the registered op that runs it.

Every fused op ``name`` exists three times: the C++ op ``torch.ops.fusedres.<name>`` (CPU and
CUDA kernels), the Triton custom op ``fusedres::<name>_triton`` and ``fusedres.ops._ref.<name>``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusedres import _extension
from fusedres.ops import _ref

_triton_ops: dict[str, Callable] = {}


def register_fake_for_cpp(name: str, fake: Callable) -> None:
    """The C++ op's fake (meta) impl; a no-op when the extension is not loaded."""
    if _extension.loaded():
        torch.library.register_fake(f"fusedres::{name}")(fake)


def register_triton(name: str, op) -> None:
    _triton_ops[name] = op


def op_for(name: str, backend: str) -> Callable:
    if backend == "cuda":
        return getattr(torch.ops.fusedres, name)
    if backend == "triton":
        return _triton_ops[name]
    return getattr(_ref, name)
