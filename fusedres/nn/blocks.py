"""Drop-in replacements for torchvision's ``Bottleneck`` and ``BasicBlock``.

Same constructor, attribute names and ``state_dict`` keys, so weights load both ways.

- Every BatchNorm normalises with running statistics (eval mode, ``FrozenBatchNorm2d``): each
  conv is one fused launch with its BN folded in and the ReLU and residual add in the epilogue
  (a Bottleneck is 3 launches, 4 with a projection shortcut).
- Every BatchNorm normalises with batch statistics (train mode): the train-mode fused path of
  ``fusedres.ops.residual_block`` (4 main launches, 5 with a projection).
- Anything else (a conv or norm layer the kernels do not take, mixed BN modes): torchvision's
  unfused math, with a one-time warning naming the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fusedres import backends
from fusedres.nn.functional import (
    bn_mode,
    conv_bn,
    resolve_momentum,
    sync_group,
    unfusable_reason,
    warn_unfusable_once,
)
from fusedres.nn.plan import EvalPlan
from fusedres.ops._validate import canonical_layout
from fusedres.ops.residual_block import BatchNormSpec, BlockSpec, ConvSpec, TrainPlan, residual_block_train


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option A of He et al. 2015: the identity, subsampled by ``stride`` and zero-padded with
    ``out_channels - in_channels`` extra channels after the input's. Parameter-free.

    ``y = F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, out_channels - in_channels))``.
    As a block's ``downsample`` it is read inside the block's last launch, in eval and train mode.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A only widens: out_channels={out_channels} < in_channels={in_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.out_channels - self.in_channels
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, extra))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _check_train_input(x: torch.Tensor, pairs) -> None:
    """What eager rejects in train mode, rejected the same way before any statistic moves: an
    input whose dtype differs from the weights' outside autocast (the eval path raises too), and
    running statistics that require grad while autograd records."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    weight = pairs[0][0].weight
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match the conv weight dtype {weight.dtype} "
                        "(convert the block with .to(dtype), or run under torch.autocast)")
    if torch.is_grad_enabled():
        for _, bn in pairs:
            for name in ("running_mean", "running_var"):
                buf = getattr(bn, name, None)
                if buf is not None and buf.requires_grad and bn.training and bn.track_running_stats:
                    raise RuntimeError(f"{name} of a train-mode BatchNorm requires grad; it is updated in "
                                       "place and cannot (as in eager BatchNorm2d)")


class _FusedBlock(nn.Module):
    """Shared machinery: the fusion decision, the shortcut, the backend."""

    # (conv, bn) attribute pairs of the residual branch, in order; the last one takes the add.
    _branch: tuple[tuple[str, str], ...] = ()
    _residual: bool = True  # False for the plain nets' blocks
    downsample: nn.Module | None
    backend: str | None
    process_group: object | None  # synchronizes train-mode BatchNorm statistics (see sync_group)

    def _projection(self) -> tuple[nn.Module, nn.Module] | None:
        """The downsample as a (conv, bn) pair when it is torchvision's conv1x1 + BN."""
        ds = self.downsample
        if isinstance(ds, nn.Sequential) and len(ds) == 2:
            return ds[0], ds[1]
        return None

    def _shortcut_kind(self) -> str:
        """'none' (plain block), 'identity', 'projection' (conv+BN), 'option_a' or 'module'."""
        if not self._residual:
            return "none"
        if self.downsample is None:
            return "identity"
        if self._projection() is not None:
            return "projection"
        return "option_a" if isinstance(self.downsample, ShortcutA) else "module"

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(getattr(self, c), getattr(self, b)) for c, b in self._branch]
        if self._projection() is not None:
            pairs.append(self._projection())
        return pairs

    def _fusion_mode(self) -> tuple[str | None, str | None]:
        """('running' | 'batch', None) when the block runs fused, else (None, reason)."""
        pairs = self._pairs()
        mode = bn_mode(pairs[0][1])
        if mode is None:
            return None, f"{type(pairs[0][1]).__name__} is not a BatchNorm the kernels take"
        if mode == "batch" and self._shortcut_kind() == "module":
            return None, f"the shortcut {type(self.downsample).__name__} is not a conv+BatchNorm projection or option A"
        for conv, bn in pairs:
            reason = unfusable_reason(conv, bn, mode)
            if reason is not None:
                return None, reason
        return mode, None

    _eval_plan: EvalPlan | None = None  # see fusedres.nn.plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._eval_plan
        if plan is not None and not torch.compiler.is_compiling():
            out = plan(x)  # None when stale
            if out is not None:
                return out
        mode, reason = self._fusion_mode()
        if mode == "running":
            return self._forward_eval(x)
        if plan is not None:  # stale from now on: no need to hold its packed weights
            self._eval_plan = None
        if mode == "batch":
            return self.forward_train_fused(x)
        warn_unfusable_once(self, reason)
        return self.forward_unfused(x)

    def forward_owned(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` for an input nothing else holds (the previous block's output inside a
        ``fusedres.nn.convert.Stage``): the eval plan may write an identity shortcut's add into it."""
        plan = self._eval_plan
        if plan is not None and not torch.compiler.is_compiling():
            out = plan(x, owned=True)
            if out is not None:
                return out
        return self.forward(x)

    def _forward_eval(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode: the block's launch plan (made now: there was none or it went stale), or the
        differentiable fused ops while autograd records, under torch.compile or autocast."""
        if (torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) or x.dim() != 4
                or torch.is_autocast_enabled(x.device.type)):
            return self.forward_fused(x)
        self._eval_plan = None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return self.forward_fused(x)
        plan, out = EvalPlan.build_and_run(self, x)
        self._eval_plan = plan
        return out

    def __getstate__(self) -> dict:
        # Copies and pickles make their own plan: packed weights are a cache, not state.
        state = dict(super().__getstate__())
        state.pop("_eval_plan", None)
        return state

    def forward_train_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Train mode (batch statistics) on the fused train ops; updates the running statistics.

        The plan (backend, fused or ATen backward GEMMs, or eager) comes from
        ``backends.resolve_train``; ``auto`` times the candidates once per block shape on a copy
        of the block, so the timing runs leave this block's statistics and gradients untouched."""
        pairs = self._pairs()
        _check_train_input(x, pairs)
        if x.shape[0] == 0:  # nothing to normalise: eager's result (empty output, statistics kept)
            return self.forward_unfused(x)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)  # convs run in the autocast dtype
        group = sync_group([bn for _, bn in pairs], self.process_group)
        tune_key = run = None
        if group is None:  # ranks of synchronized BN must not time their way to different plans
            convs = [conv for conv, _ in pairs]
            tune_key = (type(self).__name__, self._shortcut_kind(),
                        backends.tensor_key([x] + [conv.weight for conv in convs]),
                        tuple((c.stride, c.padding, c.dilation, c.groups) for c in convs))
            # Timing needs eager autograd: not while compiling, not under inference_mode.
            if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():
                run = self._timing_run(x, dtype)
        plan = backends.resolve_train(self.backend, x.device, dtype, tune_key, run)
        return self._forward_train_plan(x, plan, dtype, group)

    def _timing_run(self, x: torch.Tensor, dtype: torch.dtype) -> Callable[[object], object]:
        """``run(plan)`` for ``resolve_train``: forward + backward of a deep copy of this block."""
        state: dict[str, object] = {}

        def run(plan) -> None:
            if "block" not in state:
                state["block"] = copy.deepcopy(self)
                state["x"] = x.detach().requires_grad_(x.requires_grad)
            block, inp = state["block"], state["x"]
            out = block._forward_train_plan(inp, plan, dtype, None)
            if out.requires_grad:  # not when everything is frozen (train-mode BN statistics only)
                out.backward(torch.ones_like(out))

        return run

    def _forward_train_plan(self, x: torch.Tensor, plan, dtype: torch.dtype, group) -> torch.Tensor:
        if plan == backends.EAGER:
            return self.forward_unfused(x)
        backend, fused_backward = plan
        pairs = self._pairs()
        convs = [conv for conv, _ in pairs]
        specs = [ConvSpec(tuple(c.stride), tuple(c.padding), tuple(c.dilation), c.groups) for c in convs]
        bn_specs = [BatchNormSpec(bn.eps, resolve_momentum(bn)) for _, bn in pairs]
        params = []
        for conv, bn in pairs:
            running = (bn.running_mean, bn.running_var) if bn.training and bn.track_running_stats else (None, None)
            params += [canonical_layout(conv.weight.to(dtype)), bn.weight, bn.bias, *running]
        n = len(self._branch)
        kind = self._shortcut_kind()
        projection = kind == "projection"
        spec = BlockSpec(
            convs=tuple(specs[:n]),
            bns=tuple(bn_specs[:n]),
            shortcut=kind,
            projection_conv=specs[n] if projection else None,
            projection_bn=bn_specs[n] if projection else None,
            shortcut_stride=self.downsample.stride if kind == "option_a" else 1,
        )
        if not projection:
            params += [None] * 5
        with torch.autocast(x.device.type, enabled=False):
            return residual_block_train(canonical_layout(x.to(dtype)), TrainPlan(backend, fused_backward), spec, group,
                                        *params)

    def _shortcut(self, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """The last launch's residual and the stride it is read with (option A reads ``x`` in place)."""
        if not self._residual:
            return None, 1
        if self.downsample is None:
            return x, 1
        if isinstance(self.downsample, ShortcutA):
            return x, self.downsample.stride
        projection = self._projection()
        if projection is None:
            return self.downsample(x), 1
        return conv_bn(x, *projection, relu=False, backend=self.backend), 1

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv_name, bn_name in self._branch[:-1]:
            h = conv_bn(h, getattr(self, conv_name), getattr(self, bn_name), relu=True, backend=self.backend)
        conv_name, bn_name = self._branch[-1]
        residual, residual_stride = self._shortcut(x)
        return conv_bn(h, getattr(self, conv_name), getattr(self, bn_name), relu=True,
                       residual=residual, residual_stride=residual_stride, backend=self.backend)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's forward, op for op."""
        h = x
        for i, (conv_name, bn_name) in enumerate(self._branch):
            h = getattr(self, bn_name)(getattr(self, conv_name)(h))
            if i < len(self._branch) - 1:
                h = self.relu(h)
        if not self._residual:
            return self.relu(h)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(h + identity)

    def extra_repr(self) -> str:
        return f"backend={self.backend or 'default'}"

    @classmethod
    def from_torchvision(cls, block: nn.Module, backend: str | None = None) -> "_FusedBlock":
        """A fused block sharing ``block``'s submodules (and so its parameters and buffers)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, module in block.named_children():
            setattr(fused, name, module)
        if "downsample" not in fused._modules:
            fused.downsample = None
        fused.stride = block.stride
        fused.backend = None if backend is None else backends.check_backend(backend)
        fused.process_group = None
        fused.train(block.training)
        return fused


class Bottleneck(_FusedBlock):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3x3) on fused kernels."""

    expansion: int = 4
    _branch = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str | None = None,
        process_group: object | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.backend = None if backend is None else backends.check_backend(backend)
        self.process_group = process_group


def _init_two_conv3x3(block, inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer,
                      backend, process_group) -> None:
    """torchvision's BasicBlock layout (conv1, bn1, relu, conv2, bn2, downsample), for BasicBlock
    and PlainBlock."""
    name = type(block).__name__
    if groups != 1 or base_width != 64:
        raise ValueError(f"{name} only supports groups=1 and base_width=64")
    if dilation > 1:
        raise NotImplementedError(f"Dilation > 1 not supported in {name}")
    norm_layer = norm_layer or nn.BatchNorm2d
    block.conv1 = conv3x3(inplanes, planes, stride)
    block.bn1 = norm_layer(planes)
    block.relu = nn.ReLU(inplace=True)
    block.conv2 = conv3x3(planes, planes)
    block.bn2 = norm_layer(planes)
    block.downsample = downsample
    block.stride = stride
    block.backend = None if backend is None else backends.check_backend(backend)
    block.process_group = process_group


class BasicBlock(_FusedBlock):
    """torchvision's ``BasicBlock`` (two 3x3 convs) on fused kernels."""

    expansion: int = 1
    _branch = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str | None = None,
        process_group: object | None = None,
    ) -> None:
        super().__init__()
        _init_two_conv3x3(self, inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer,
                          backend, process_group)


class PlainBlock(_FusedBlock):
    """A ``BasicBlock`` without its shortcut, ``relu(bn2(conv2(relu(bn1(conv1(x))))))``: the
    building block of the paper's plain networks, fused like the residual blocks.

    Constructor and attribute names follow torchvision's ``BasicBlock``, so
    ``torchvision.models.resnet.ResNet(PlainBlock, layers)`` builds a plain net; the
    ``downsample`` that ResNet passes where the dimensions change is dropped.
    """

    expansion: int = 1
    _branch = (("conv1", "bn1"), ("conv2", "bn2"))
    _residual = False

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str | None = None,
        process_group: object | None = None,
    ) -> None:
        super().__init__()
        # The downsample torchvision's ResNet passes where the shape changes has no use here.
        _init_two_conv3x3(self, inplanes, planes, stride, None, groups, base_width, dilation, norm_layer,
                          backend, process_group)
