"""A converted block's launch plan for eval (BatchNorm with running statistics).

Made once per block, kept until something it depends on changes, and then remade:

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
place into the shortcut when the block owns it); otherwise the backend's fused ``conv_bn_act``
kernel, resolved once when the plan is made (``auto`` times its candidates then). The steady
state is a signature comparison and the launches: no fold, no backend resolution, no
validation the plan already did, no weight re-layout.

The plan serves calls that record no autograd (``torch.no_grad``, ``inference_mode``, or
nothing requires grad); calls that do take the differentiable fused ops (``forward_fused``).
"""

from __future__ import annotations

import warnings
from operator import attrgetter, getitem

import torch
from torch import nn

from fusedres import backends
from fusedres.ops import onednn
from fusedres.ops._dispatch import kernel_for, op_for
from fusedres.ops._validate import CHECKS, canonical_layout
from fusedres.ops.bn_fold import fold

ONEDNN = "onednn"  # the kernel name of the oneDNN eval convs (see backends.kernels_of)
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


class _OneDnnStep:
    """A conv on oneDNN (``onednn.PackedConv``); the option-A shortcut is materialised for it."""

    kernel = ONEDNN
    owns_option_a = False

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor) -> None:
        weight, shift = fold(conv, bn)
        self.packed = onednn.PackedConv(weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups,
                                        x.shape, x.dtype)

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


class EvalPlan:
    """The eval launches of one block for one input dtype and device (see the module doc)."""

    def __init__(self, block: nn.Module, x: torch.Tensor) -> None:
        pairs = block._pairs()
        self.device, self.dtype, self._device_type = x.device, x.dtype, x.device.type
        self.in_channels = pairs[0][0].in_channels
        self.shortcut = block._shortcut_kind()
        self.downsample = block.downsample
        self.option_a_stride = block.downsample.stride if self.shortcut == "option_a" else 1
        requested = block.backend or backends.get_default_backend()
        self.requested = requested
        self.onednn_reason = onednn_reason(x.device, x.dtype, requested)
        # What the signature watches.
        tensor_slots, attr_slots = [], [(block.__dict__, "backend")]
        for conv, bn in pairs:
            tensor_slots += [_slot(conv, "weight"), _slot(conv, "bias")]
            tensor_slots += [_slot(bn, n) for n in ("weight", "bias", "running_mean", "running_var")]
            attr_slots += [_slot(conv, n) for n in ("stride", "padding", "dilation", "groups", "padding_mode")]
            attr_slots += [_slot(bn, n) for n in ("eps", "momentum", "training", "track_running_stats")
                           if n in bn.__dict__]
        if self.shortcut == "option_a":
            attr_slots += [_slot(block.downsample, n) for n in ("stride", "in_channels", "out_channels")]
        self._block = block
        self._tensor_dicts, self._tensor_names = zip(*tensor_slots)
        self._attr_dicts, self._attr_names = zip(*attr_slots)
        self._modules = tuple(block._modules.values())
        self._fill_signature()
        self.valid_for = self._make_check()  # valid_for(x): True while this plan computes the block
        self.steps: list = []

    def _fill_signature(self) -> None:
        current = list(map(getitem, self._tensor_dicts, self._tensor_names))
        # Slots holding a tensor are watched by (version, data_ptr) of whatever tensor they hold
        # now; the plan keeps the tensors it was made from alive, so another tensor at the same
        # address aliases the same memory. Empty slots (no conv bias) must stay empty.
        full = [i for i, t in enumerate(current) if t is not None]
        empty = [i for i, t in enumerate(current) if t is None]
        self._full_dicts = tuple(self._tensor_dicts[i] for i in full)
        self._full_names = tuple(self._tensor_names[i] for i in full)
        self._empty_dicts = tuple(self._tensor_dicts[i] for i in empty)
        self._empty_names = tuple(self._tensor_names[i] for i in empty)
        self._nones = [None] * len(empty)
        self._tensors = [current[i] for i in full]
        self._versions = list(map(_version, self._tensors))
        self._ptrs = list(map(_data_ptr, self._tensors))
        self._attrs = list(map(getitem, self._attr_dicts, self._attr_names))
        self._default = backends.get_default_backend()
        self._inference = torch.is_inference_mode_enabled()

    def __call__(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor | None:
        """The block's output for ``x``, or None when the plan is stale for ``x`` or autograd
        records this call (the block then falls back, and remakes the plan where it can).
        ``owned``: nothing else holds ``x`` (a previous block's output inside a converted stage),
        so an identity shortcut's add may write into it."""
        if not self.valid_for(x) or (torch.is_grad_enabled() and self.records_autograd(x)):
            return None
        return self._call(x, owned)

    def _make_check(self):
        """``valid_for`` as a closure over everything it compares: locals, not attribute lookups,
        in the check every steady-state call makes (it is most of the plan's host time)."""
        full_dicts, full_names = self._full_dicts, self._full_names
        empty_dicts, empty_names, nones = self._empty_dicts, self._empty_names, self._nones
        attr_dicts, attr_names, attrs = self._attr_dicts, self._attr_names, self._attrs
        versions, ptrs = self._versions, self._ptrs
        submodules, modules = self._block._modules, self._modules
        dtype, device, device_type = self.dtype, self.device, self._device_type
        default, inference = self._default, self._inference
        get_default, inference_mode, autocast = (backends.get_default_backend, torch.is_inference_mode_enabled,
                                                 torch.is_autocast_enabled)

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

        return valid_for

    def records_autograd(self, x: torch.Tensor) -> bool:
        """True when autograd would record this call (then the differentiable ops run instead)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self._tensors))

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
            self.steps.append(_OneDnnStep(conv, bn, h))
            if len(self.steps) < n:
                h = self.steps[-1](h, True)
        if self.shortcut == "projection":
            self.projection = _OneDnnStep(*pairs[n], x_cl)
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
        """The steady-state call on oneDNN, one closure per shortcut kind: locals only, no branch
        that the plan already decided."""
        conv = torch.ops.mkldnn._convolution_pointwise.default
        conv_add = torch.ops.mkldnn._convolution_pointwise.binary
        conv_add_ = torch.ops.mkldnn._convolution_pointwise_.binary  # in place into its first argument
        head = tuple(step.packed.args for step in self.steps[:-1])
        last = self.steps[-1].packed.args
        kind = self.shortcut
        cl = _CL

        if kind == "none":
            def run(x, owned=False):
                h = x if x.is_contiguous(memory_format=cl) else x.contiguous(memory_format=cl)
                for args in head:
                    h = conv(h, *args, "relu", [], None)
                return conv(h, *last, "relu", [], None)
        elif kind == "identity":
            def run(x, owned=False):
                if not x.is_contiguous(memory_format=cl):  # the channels_last copy is ours: add into it
                    x, owned = x.contiguous(memory_format=cl), True
                h = x
                for args in head:
                    h = conv(h, *args, "relu", [], None)
                if owned:
                    return conv_add_(x, h, *last, "add", None, "relu", [], None)
                return conv_add(h, x, *last, "add", None, "relu", [], None)
        elif kind == "projection":
            projection = self.projection.packed.args

            def run(x, owned=False):
                if not x.is_contiguous(memory_format=cl):
                    x = x.contiguous(memory_format=cl)
                h = x
                for args in head:
                    h = conv(h, *args, "relu", [], None)
                shortcut = conv(x, *projection, "none", [], None)  # a temporary: add in place
                return conv_add_(shortcut, h, *last, "add", None, "relu", [], None)
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

