"""Launch plans for eval (BatchNorm with running statistics): a converted block's
(``EvalPlan``) and a converted ResNet stem's (``StemPlan``).

Made once per block, kept until something it depends on changes (its ``Signature``), and then
remade:

- every parameter and buffer of the block's (conv, BN) pairs: identity, storage (``data_ptr``)
  and version counter (in-place updates bump it: an optimizer step, ``load_state_dict``, BN
  buffer updates; ``.to()`` swaps the storage, ``module.weight = ...`` the identity);
- every attribute the launches read: ``eps``, ``momentum``, ``training`` and
  ``track_running_stats`` of each BN, the conv geometry and padding mode, the block's submodules
  and backend, the default backend;
- the input's dtype and device, and whether inference mode is on.

What it holds: per conv the BN-folded weight, bias and geometry, bound to one kernel. On the CPU
in fp32 (and bf16 where the CPU has it) with backend ``auto`` that kernel is oneDNN
(``fusedres.ops.onednn``: prepacked weight, ReLU and the residual add as post-ops, the add in
place into the shortcut when the block owns it), or for a 3x3 stride-1 fp32 conv Winograd
F(2x2, 3x3) (``fusedres.ops.winograd``, same epilogue) where it times faster on the plan's first
input (``WINOGRAD``); otherwise the backend's fused ``conv_bn_act`` kernel, resolved once when
the plan is made (``auto`` times its candidates then). The steady state is a signature
comparison and the launches: no fold, no backend resolution, no validation the plan already
did, no weight re-layout.

The plan serves calls that record no autograd (``torch.no_grad``, ``inference_mode``, or
nothing requires grad); calls that do take the differentiable fused ops (``forward_fused``).
"""

from __future__ import annotations

import os
import time
import warnings
from operator import attrgetter, getitem

import torch
from torch import nn

from fusedres import backends
from fusedres.ops import onednn, winograd
from fusedres.ops._dispatch import kernel_for, op_for
from fusedres.ops._validate import CHECKS, canonical_layout
from fusedres.ops.bn_fold import fold

ONEDNN = "onednn"  # the kernel name of the oneDNN eval convs (see backends.kernels_of)
WINOGRAD_KERNEL = "winograd"  # the kernel name of the Winograd eval convs (fusedres.ops.winograd)
# Where the CPU eval path may run a 3x3 stride-1 fp32 conv as Winograd F(2x2, 3x3): "timed" (when
# it takes under WINOGRAD_MARGIN of oneDNN's time on the plan's first input), "on" or "off".
WINOGRAD = os.environ.get("FUSEDRES_WINOGRAD", "timed")
WINOGRAD_MARGIN = 0.9
if WINOGRAD not in ("timed", "on", "off"):
    raise ValueError(f"FUSEDRES_WINOGRAD must be 'timed', 'on' or 'off', got {WINOGRAD!r}")
_winograd_faster: dict[tuple, bool] = {}  # (input shape, weight shape, threads) -> timed choice
_CL = torch.channels_last
_version = attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr
_warned: set[str] = set()


def _warn_once(reason: str, used: str, device: torch.device) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"fusedres: eval convs run on {used!r} ({backends.kernels_of(used, device)}), not on oneDNN: "
                  f"{reason}", stacklevel=4)


def onednn_reason(device: torch.device, dtype: torch.dtype, requested: str) -> str | None:
    """Why a block's eval convs do not run on oneDNN for this backend, device and dtype, or None.

    oneDNN is what ``auto`` means for eval convs on the CPU; a named backend runs its own kernels
    (``native``: the C++ CPU kernels, the twins of the CUDA kernels)."""
    if requested != "auto":
        return f"backend {requested!r} was requested"
    return onednn.unusable_reason(device, dtype)


def _median_seconds(packed, x: torch.Tensor, repeats: int = 5) -> float:
    """The median time of ``packed(x, relu=True)``, after a warm-up call (first-touch
    allocations, oneDNN's primitive cache)."""
    packed(x, True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        packed(x, True)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


class _CpuEvalStep:
    """A conv of the CPU eval path: oneDNN's prepacked direct conv (``onednn.PackedConv``), or,
    for a 3x3 stride-1 fp32 conv where it measures faster on the plan's first input, Winograd
    F(2x2, 3x3) (``winograd.PackedWinograd``; see ``WINOGRAD``). The option-A shortcut is
    materialised for it."""

    owns_option_a = False

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor) -> None:
        weight, shift = fold(conv, bn)
        geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
        self.packed, self.kernel = onednn.PackedConv(weight, shift, *geometry, x.shape, x.dtype), ONEDNN
        if (WINOGRAD == "off" or winograd.unusable_reason(conv.kernel_size, *geometry, x.dtype, x.device)
                or (WINOGRAD == "timed" and x.numel() == 0)):  # nothing to time on
            return
        candidate = winograd.PackedWinograd(weight, shift, *geometry, x.shape, x.dtype)
        if WINOGRAD == "timed":
            # Timed once per shape and thread count: a plan remade after a weight update reuses it.
            key = (tuple(x.shape), tuple(weight.shape), torch.get_num_threads())
            if key not in _winograd_faster:
                _winograd_faster[key] = (_median_seconds(candidate, x)
                                         < WINOGRAD_MARGIN * _median_seconds(self.packed, x))
            if not _winograd_faster[key]:
                return
        self.packed, self.kernel = candidate, WINOGRAD_KERNEL

    def __call__(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        return self.packed(x, relu)

    def add_relu(self, x: torch.Tensor, residual: torch.Tensor, inplace: bool, residual_stride: int = 1):
        return self.packed.add_relu(x, residual, inplace)


class _KernelStep:
    """A conv on one backend's fused ``conv_bn_act`` kernel, resolved once (``auto`` times it)."""

    owns_option_a = True

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor, requested: str,
                 residual: torch.Tensor | None, residual_stride: int, relu: bool) -> None:
        weight, shift = fold(conv, bn)
        self.weight = canonical_layout(weight.to(x.dtype).detach())
        self.shift = shift.detach()
        self.geometry = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
        args = (x, self.weight, None, self.shift, residual, *self.geometry, relu, residual_stride)
        tune_key = ("conv_bn_act", backends.tensor_key((x, self.weight, residual)), *self.geometry, relu,
                    True, False, residual_stride)
        self.kernel = backends.resolve(requested, x.device, x.dtype, tune_key,
                                       lambda b: op_for("conv_bn_act", b)(*args))
        # Unvalidated: the operands are checked once per input shape (the plan's signature
        # already pins dtype, device and every parameter), not on every call.
        self.op = kernel_for("conv_bn_act", self.kernel)
        self._checked_shapes: set[tuple] = set()

    def _run(self, x, residual, relu, residual_stride):
        args = (x, self.weight, None, self.shift, residual, *self.geometry, relu, residual_stride)
        shapes = (x.shape, None if residual is None else residual.shape, residual_stride)
        if shapes not in self._checked_shapes:
            CHECKS["conv_bn_act"](*args)
            self._checked_shapes.add(shapes)
        return self.op(*args)

    def __call__(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        return self._run(x, None, relu, 1)

    def add_relu(self, x: torch.Tensor, residual: torch.Tensor, inplace: bool, residual_stride: int = 1):
        return self._run(x, residual, True, residual_stride)


def _slot(module: nn.Module, name: str) -> tuple[dict, str]:
    """The dict that holds ``module.<name>`` (parameters, buffers or plain attributes)."""
    for store in (module._parameters, module._buffers):
        if name in store:
            return store, name
    return module.__dict__, name


class Signature:
    """What a plan depends on, compared on every call (the steady state's only check).

    ``tensor_slots`` and ``attr_slots`` are (dict, name) pairs (see ``_slot``): a slot holding a
    tensor is watched by the (version, data_ptr) of whatever tensor it holds now, and the plan
    keeps the tensors it was made from alive, so another tensor at the same address aliases the
    same memory; empty slots (no conv bias) must stay empty; attributes compare equal.
    ``submodules`` (a module's ``_modules``) must keep the same children. The input's dtype and
    device, inference mode, autocast and the default backend are watched as well."""

    def __init__(self, tensor_slots: list, attr_slots: list, submodules: dict, x: torch.Tensor) -> None:
        dicts, names = zip(*tensor_slots)
        current = list(map(getitem, dicts, names))
        full = [i for i, t in enumerate(current) if t is not None]
        empty = [i for i, t in enumerate(current) if t is None]
        self.tensors = [current[i] for i in full]  # kept alive: see the class doc
        full_dicts, full_names = tuple(dicts[i] for i in full), tuple(names[i] for i in full)
        empty_dicts, empty_names = tuple(dicts[i] for i in empty), tuple(names[i] for i in empty)
        nones = [None] * len(empty)
        versions = list(map(_version, self.tensors))
        ptrs = list(map(_data_ptr, self.tensors))
        attr_dicts, attr_names = zip(*attr_slots) if attr_slots else ((), ())
        attrs = list(map(getitem, attr_dicts, attr_names))
        modules = tuple(submodules.values())
        dtype, device, device_type = x.dtype, x.device, x.device.type
        default, inference = backends.get_default_backend(), torch.is_inference_mode_enabled()
        get_default, inference_mode, autocast = (backends.get_default_backend, torch.is_inference_mode_enabled,
                                                 torch.is_autocast_enabled)

        # A closure over locals, not attribute lookups: it is most of a plan's host time.
        def valid_for(x: torch.Tensor) -> bool:
            if x.dtype is not dtype or x.device != device:
                return False
            try:
                current = list(map(getitem, full_dicts, full_names))
                if list(map(_version, current)) != versions or list(map(_data_ptr, current)) != ptrs:
                    return False
                same_attrs = list(map(getitem, attr_dicts, attr_names)) == attrs
            except (AttributeError, TypeError, KeyError):  # a slot emptied, deleted or given a non-tensor
                return False
            return (
                same_attrs
                and list(map(getitem, empty_dicts, empty_names)) == nones
                and tuple(submodules.values()) == modules
                and get_default() == default
                and inference_mode() == inference
                and not autocast(device_type)
            )

        self.valid_for = valid_for

    def records_autograd(self, x: torch.Tensor) -> bool:
        """True when autograd would record a call on ``x`` (then the differentiable ops run)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self.tensors))


def pair_slots(conv: nn.Conv2d, bn: nn.Module) -> tuple[list, list]:
    """The tensor and attribute slots of a (conv, BN) pair that a folded launch reads."""
    tensor_slots = [_slot(conv, "weight"), _slot(conv, "bias")]
    tensor_slots += [_slot(bn, n) for n in ("weight", "bias", "running_mean", "running_var")]
    attr_slots = [_slot(conv, n) for n in ("stride", "padding", "dilation", "groups", "padding_mode")]
    attr_slots += [_slot(bn, n) for n in ("eps", "momentum", "training", "track_running_stats") if n in bn.__dict__]
    return tensor_slots, attr_slots


class EvalPlan:
    """The eval launches of one block for one input dtype and device (see the module doc)."""

    def __init__(self, block: nn.Module, x: torch.Tensor) -> None:
        pairs = block._pairs()
        self.device, self.dtype = x.device, x.dtype
        self.in_channels = pairs[0][0].in_channels
        self.shortcut = block._shortcut_kind()
        self.downsample = block.downsample
        self.option_a_stride = block.downsample.stride if self.shortcut == "option_a" else 1
        requested = block.backend or backends.get_default_backend()
        self.requested = requested
        self.onednn_reason = onednn_reason(x.device, x.dtype, requested)
        tensor_slots, attr_slots = [], [(block.__dict__, "backend")]
        for conv, bn in pairs:
            tensors, attrs = pair_slots(conv, bn)
            tensor_slots += tensors
            attr_slots += attrs
        if self.shortcut == "option_a":
            attr_slots += [_slot(block.downsample, n) for n in ("stride", "in_channels", "out_channels")]
        self._block = block
        self.signature = Signature(tensor_slots, attr_slots, block._modules, x)
        self.valid_for = self.signature.valid_for  # valid_for(x): True while this plan computes the block
        self.records_autograd = self.signature.records_autograd
        self.steps: list = []

    def __call__(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor | None:
        """The block's output for ``x``, or None when the plan is stale for ``x`` or autograd
        records this call (the block then falls back, and remakes the plan where it can).
        ``owned``: nothing else holds ``x`` (a previous block's output inside a converted stage),
        so an identity shortcut's add may write into it."""
        if not self.valid_for(x) or (torch.is_grad_enabled() and self.records_autograd(x)):
            return None
        return self._call(x, owned)

    @classmethod
    def build_and_run(cls, block: nn.Module, x: torch.Tensor) -> tuple["EvalPlan", torch.Tensor]:
        """A new plan for ``block`` and its output for ``x`` (``auto`` times kernels on ``x``)."""
        plan = cls(block, x)
        if plan.onednn_reason is None:
            return plan._build_onednn(x)
        plan, out = plan._build_kernels(x)
        if x.device.type == "cpu" and plan.requested == "auto":
            _warn_once(plan.onednn_reason, plan.kernels[0], x.device)
        return plan, out

    def _build_onednn(self, x: torch.Tensor) -> tuple["EvalPlan", torch.Tensor]:
        x_cl = x.contiguous(memory_format=_CL)
        pairs = self._block._pairs()
        n = len(self._block._branch)
        h = x_cl
        for conv, bn in pairs[:n]:
            self.steps.append(_CpuEvalStep(conv, bn, h))
            if len(self.steps) < n:
                h = self.steps[-1](h, True)
        if self.shortcut == "projection":
            self.projection = _CpuEvalStep(*pairs[n], x_cl)
        self._call = self._onednn_runner()
        return self, self._call(x)

    def _build_kernels(self, x: torch.Tensor) -> tuple["EvalPlan", torch.Tensor]:
        block = self._block
        pairs = block._pairs()
        n = len(block._branch)
        x = canonical_layout(x)
        h = x
        for conv, bn in pairs[: n - 1]:
            self.steps.append(_KernelStep(conv, bn, h, self.requested, None, 1, True))
            h = self.steps[-1](h, True)
        if self.shortcut == "projection":
            self.projection = _KernelStep(*pairs[n], x, self.requested, None, 1, False)
        residual, stride = self._residual(x)
        self.steps.append(_KernelStep(*pairs[n - 1], h, self.requested, residual, stride, True))
        self._call = self._run
        return self, self._run(x)

    def _onednn_runner(self):
        """The steady-state call of the CPU eval path, one closure per shortcut kind: locals only,
        no branch that the plan already decided. Each launch is an (op, args) pair of the step's
        packed conv (``onednn.PackedConv`` or ``winograd.PackedWinograd``)."""
        head = tuple(step.packed.relu_launch for step in self.steps[:-1])
        last = self.steps[-1].packed
        into, into_args = last.add_relu_into_launch  # into(residual, h, *args) writes into residual
        kind = self.shortcut
        cl = _CL

        if kind == "none":
            last_op, last_args = last.relu_launch

            def run(x, owned=False):
                h = x if x.is_contiguous(memory_format=cl) else x.contiguous(memory_format=cl)
                for op, args in head:
                    h = op(h, *args)
                return last_op(h, *last_args)
        elif kind == "identity":
            add, add_args = last.add_relu_launch  # add(h, residual, *args): a new tensor

            def run(x, owned=False):
                if not x.is_contiguous(memory_format=cl):  # the channels_last copy is ours: add into it
                    x, owned = x.contiguous(memory_format=cl), True
                h = x
                for op, args in head:
                    h = op(h, *args)
                if owned:
                    return into(x, h, *into_args)
                return add(h, x, *add_args)
        elif kind == "projection":
            projection, projection_args = self.projection.packed.launch

            def run(x, owned=False):
                if not x.is_contiguous(memory_format=cl):
                    x = x.contiguous(memory_format=cl)
                h = x
                for op, args in head:
                    h = op(h, *args)
                shortcut = projection(x, *projection_args)  # a temporary: add in place
                return into(shortcut, h, *into_args)
        else:  # option A or another shortcut module: the general path
            return self._run
        return run

    def _residual(self, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        kind = self.shortcut
        if kind == "none":
            return None, 1
        if kind == "identity":
            return x, 1
        if kind == "projection":
            return self.projection(x, False), 1
        if kind == "option_a":
            if self.steps[-1].owns_option_a:  # the kernel reads x strided in its epilogue
                return x, self.option_a_stride
            s = self.option_a_stride
            sub = x[:, :, ::s, ::s]
            out = torch.empty((sub.shape[0], self.downsample.out_channels, *sub.shape[2:]), dtype=sub.dtype,
                              device=sub.device, memory_format=_CL)
            out[:, sub.shape[1]:] = 0
            out[:, : sub.shape[1]] = sub
            return out, 1
        return self.downsample(x), 1

    @property
    def kernels(self) -> tuple[str, ...]:
        """The kernel of each conv: the branch's, then the projection's."""
        steps = self.steps + ([self.projection] if self.shortcut == "projection" else [])
        return tuple(step.kernel for step in steps)

    def _run(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        onednn_path = self.onednn_reason is None
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W) for this block, got {tuple(x.shape)}")
        if onednn_path:
            x_cl = x.contiguous(memory_format=_CL)
            owned = owned or x_cl is not x  # a copy only this call holds: the add may write into it
            x = x_cl
        else:
            x = canonical_layout(x)
        steps = self.steps
        h = x
        for step in steps[:-1]:
            h = step(h, True)
        last = steps[-1]
        if self.shortcut == "none":
            return last(h, True)
        residual, stride = self._residual(x)
        # In place only into a temporary this call made (a projection's output, the option-A
        # padding, a channels_last copy of x); never into the caller's x or a module's output.
        inplace = onednn_path and (self.shortcut in ("projection", "option_a") or (self.shortcut == "identity"
                                                                                     and owned))
        return last.add_relu(h, residual, inplace, stride)



class StemPlan:
    """A ResNet's stem, ``relu(bn1(conv1(x)))`` in eval, as one oneDNN call (BN folded into the
    prepacked weight, ReLU the post-op) for one input dtype and device. Its output is
    channels_last whatever the input's layout: the 3-channel input is cheap to convert, and
    everything after it then runs channels_last without another copy.

    ``owner`` is the module holding conv1, bn1 and relu (its ``backend`` and children are watched)."""

    def __init__(self, owner: nn.Module, conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor) -> None:
        tensor_slots, attr_slots = pair_slots(conv, bn)
        self.signature = Signature(tensor_slots, [(owner.__dict__, "backend"), *attr_slots], owner._modules, x)
        weight, shift = fold(conv, bn)
        self.packed = onednn.PackedConv(weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups,
                                        x.shape, x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The stem's output for ``x``, or None when the plan is stale for ``x`` or autograd records."""
        signature = self.signature
        if not signature.valid_for(x) or (torch.is_grad_enabled() and signature.records_autograd(x)):
            return None
        return self.packed(x if x.is_contiguous(memory_format=_CL) else x.contiguous(memory_format=_CL), True)
