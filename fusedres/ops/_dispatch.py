"""Maps a concrete backend to the registered op that runs it, behind one validation.

Every fused op ``name`` exists three times: the C++ op ``torch.ops.fusedres.<name>`` (the
``native`` backend: CPU and CUDA kernels), the Triton custom op ``fusedres::<name>_triton`` and
``fusedres.ops._ref.<name>``; the convs also as cuDNN graphs, ``fusedres::<name>_cudnn``
(``cudnn``, fusedres/ops/cudnn.py). ``op_for`` returns it wrapped so that, whatever the backend:

- the operands are validated first (``fusedres.ops._validate.CHECKS``: same errors everywhere);
- every tensor the op updates in place (``MUTATED``) has its version counter bumped, so caches
  keyed on versions (the BN fold) see the update; the C++ ops' kernels write through raw
  pointers, which autograd cannot see;
- such a tensor that is a non-contiguous view (``buf[1::2]``) is updated through a dense copy
  and written back through the view, as every kernel expects dense operands.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from fusedres import _extension
from fusedres.ops import _ref
from fusedres.ops._validate import CHECKS

_triton_ops: dict[str, Callable] = {}
# Positions of the arguments each op updates in place.
MUTATED = {"bn_finalize": (5, 6)}


def register_fake_for_cpp(name: str, fake: Callable) -> None:
    """The C++ op's fake (meta) impl; a no-op when the extension is not loaded."""
    if _extension.loaded():
        torch.library.register_fake(f"fusedres::{name}")(fake)


def register_triton(name: str, op) -> None:
    _triton_ops[name] = op


def kernel_for(name: str, backend: str) -> Callable:
    """The backend's op itself, unvalidated: for callers that have just validated the operands."""
    if backend == "native":
        return getattr(torch.ops.fusedres, name)
    if backend == "triton":
        return _triton_ops[name]
    if backend == "cudnn":
        from fusedres.ops import cudnn

        # cuDNN graphs for the convs (each case falling back where cuDNN offers none); the
        # native kernels for the elementwise ops, which have no graph of their own.
        return cudnn.op(name) if name in cudnn.OPS else getattr(torch.ops.fusedres, name)
    return getattr(_ref, name)


def op_for(name: str, backend: str) -> Callable:
    """``name`` on ``backend``, validated, with in-place updates made visible (see the module doc)."""
    return _wrapped[name, backend]


def _checked(name: str, backend: str) -> Callable:
    check = CHECKS[name]
    mutated = MUTATED.get(name, ())
    if not mutated:
        def run(*args, **kwargs):
            check(*args, **kwargs)
            return kernel_for(name, backend)(*args, **kwargs)
    else:
        def run(*args, **kwargs):
            check(*args, **kwargs)
            return _run_mutating(name, kernel_for(name, backend), args, kwargs, mutated)
    run.__name__ = run.__qualname__ = f"{name}_checked"
    run.__doc__ = f"``{name}`` on {backend!r}, validated by fusedres.ops._validate.CHECKS[{name!r}]."
    return run


# Made once, here: op_for is a lookup (no cache filled while torch.compile traces it).
_wrapped = {(name, backend): _checked(name, backend)
            for name in CHECKS for backend in ("native", "cudnn", "triton", "reference")}


def _run_mutating(name: str, kernel: Callable, args: tuple, kwargs: dict, positions: tuple[int, ...]):
    if kwargs:  # one positional spelling, so the mutated operands are found by position
        args = tuple(inspect.signature(getattr(_ref, name)).bind(*args, **kwargs).arguments.values())
    targets = [(i, args[i]) for i in positions if i < len(args) and args[i] is not None]
    views = [(i, t) for i, t in targets if not t.is_contiguous()]
    if views:
        args = list(args)
        for i, t in views:
            args[i] = t.contiguous()
    # Inference tensors have no version counter; under torch.compile functionalization copies
    # the update back (a versioned write).
    tracked = [] if torch.compiler.is_compiling() else [t for _, t in targets if not t.is_inference()]
    versions = [t._version for t in tracked]
    out = kernel(*args)
    for i, t in views:
        t.copy_(args[i])  # bumps t's version
    stale = [t for t, v in zip(tracked, versions) if t._version == v]
    if stale:
        torch.autograd.graph.increment_version(stale)
    return out
