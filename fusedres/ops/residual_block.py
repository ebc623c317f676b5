"""A residual block in train mode as one autograd unit over the fused train ops.

Forward (DESIGN.md §2 "Train"): for each conv of the residual branch one ``conv_bn_stats``
launch (the previous BN+ReLU applied in its prologue, the batch statistics of its output in its
epilogue) and a tiny ``bn_finalize``; then one ``bn_add_act`` launch for the last BN, the
shortcut (identity, projection with its own BN, option A, or none for plain nets) and the
final ReLU. A Bottleneck is 4 main launches, 5 with a projection shortcut.

Synchronized BatchNorm: with a process group, each BN's per-process ``(count, mean, m2)`` are
all-gathered between the stats and the finalize step and merged with Chan's formula in rank
order (deterministic); backward gathers the two per-channel sums the same way.

Saved for backward: the block input, the raw conv outputs, per-channel statistics and the
block output (which the next block saves anyway as its input). The ReLU'd activations are
recomputed from the raw conv outputs when backward needs them.

Backward, two strategies (``TrainPlan.fused_backward``):

- fused: per conv one ``conv_bn_backward`` call whose GEMMs read this BN's backward term
  ``grad_scale * (g - mean_g - (y - mean) * xhat_coef)`` and the previous BN+ReLU as
  prologues, and whose dgrad epilogue applies the previous ReLU's mask and reduces that BN's
  two sums (DESIGN.md §2).
- split: the fused BN reduction/elementwise kernels around ATen's ``convolution_backward``
  (cuDNN on a GPU), which ``auto`` picks where cuDNN's GEMMs are faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from fusedres.ops._aten import convolution_backward
from fusedres.ops._dispatch import op_for
from fusedres.ops.conv_bn_backward import bn_backward_coef

_CL = torch.channels_last


@dataclass(frozen=True)
class TrainPlan:
    """How a block runs in train mode: the backend of every fused op, and whether backward uses
    the fused backward convs (``conv_bn_backward``) or ATen's GEMMs between fused BN kernels."""

    backend: str
    fused_backward: bool = True

    def __str__(self) -> str:
        return self.backend if self.fused_backward else f"{self.backend}+aten-gemm"


@dataclass(frozen=True)
class ConvSpec:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


@dataclass(frozen=True)
class BatchNormSpec:
    eps: float
    momentum: float  # already resolved, as nn.BatchNorm2d does for momentum=None


@dataclass(frozen=True)
class BlockSpec:
    """Static description of a block: its branch convs/BNs and the shortcut kind."""

    convs: tuple[ConvSpec, ...]
    bns: tuple[BatchNormSpec, ...]
    shortcut: str  # "identity", "projection", "option_a" or "none"
    projection_conv: ConvSpec | None = None
    projection_bn: BatchNormSpec | None = None
    shortcut_stride: int = 1  # option A's subsampling


@dataclass
class _Layer:
    """What one conv+BN keeps for backward: its raw output and per-channel statistics."""

    weight: torch.Tensor
    gamma: torch.Tensor | None
    y: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    count: int

    TENSORS = ("weight", "gamma", "y", "mean", "invstd", "scale", "shift")

    def tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, name) for name in self.TENSORS]

    @classmethod
    def from_saved(cls, saved, count: int) -> "_Layer":
        return cls(*saved, count=count)


def _gather_in_rank_order(local: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return parts


def _sync_stats(count: int, mean: torch.Tensor, m2: torch.Tensor, group):
    """Every process's (count, mean, m2) merged with Chan's formula, in rank order."""
    local = torch.stack([torch.full_like(mean, count), mean, m2]).double()  # counts exact past 2^24
    parts = _gather_in_rank_order(local, group)
    n, mu, m2_total = parts[0].unbind(0)
    for part in parts[1:]:
        nb, mub, m2b = part.unbind(0)
        total = n + nb
        delta = mub - mu
        mu = mu + delta * (nb / total)
        m2_total = m2_total + m2b + delta.square() * (n * nb / total)
        n = total
    return int(n[0].item()), mu.to(mean.dtype), m2_total.to(m2.dtype)


def _sync_sums(sums: tuple[torch.Tensor, ...], group) -> tuple[torch.Tensor, ...]:
    parts = _gather_in_rank_order(torch.stack(sums), group)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return tuple(total.unbind(0))


def _conv_bn_train(op, x, weight, gamma, beta, running_mean, running_var, conv: ConvSpec, bn: BatchNormSpec,
                   scale_in=None, shift_in=None, group=None) -> _Layer:
    y, mean, m2 = op("conv_bn_stats")(x, weight, scale_in, shift_in, conv.stride, conv.padding, conv.dilation, conv.groups)
    count = y.numel() // y.shape[1]
    if group is not None:
        count, mean, m2 = _sync_stats(count, mean, m2, group)
    # nn.BatchNorm2d's check, with its message (over all processes, as nn.SyncBatchNorm counts):
    # one value has no variance. Before bn_finalize, so the running statistics stay untouched.
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.shape}")
    scale, shift, invstd = op("bn_finalize")(mean, m2, count, gamma, beta, running_mean, running_var, bn.momentum, bn.eps)
    return _Layer(weight, gamma, y, mean, invstd, scale, shift, count)


def _bn_grads(op, grad, layer: _Layer, group, act_out=None, act_scale=None, act_shift=None):
    """(dy, dgamma, dbeta) of one train-mode BN followed by a ReLU (mask given by the act_*).

    With synchronized BN the input gradient needs the sums over all processes, while dgamma and
    dbeta stay this process's share, as nn.SyncBatchNorm leaves them for DDP to reduce."""
    sum_g, sum_g_xhat = op("bn_backward_reduce")(grad, layer.y, layer.mean, layer.invstd, act_out, act_scale, act_shift)
    total_g, total_g_xhat = (sum_g, sum_g_xhat) if group is None else _sync_sums((sum_g, sum_g_xhat), group)
    dy = op("bn_backward_elemt")(grad, layer.y, layer.mean, layer.invstd, layer.gamma, total_g, total_g_xhat,
                                 layer.count, act_out, act_scale, act_shift)
    return dy, sum_g_xhat, sum_g


def _reduce_to_coef(op, grad, layer: _Layer, group):
    """This BN's backward as per-channel coefficients for the next convs' prologues, and its
    (dgamma, dbeta). ``grad`` is the gradient after the ReLU mask."""
    sum_g, sum_g_xhat = op("bn_backward_reduce")(grad, layer.y, layer.mean, layer.invstd, None, None, None)
    return _coef_from_sums(layer, sum_g, sum_g_xhat, group)


def _coef_from_sums(layer: _Layer, sum_g, sum_g_xhat, group):
    total_g, total_g_xhat = (sum_g, sum_g_xhat) if group is None else _sync_sums((sum_g, sum_g_xhat), group)
    coef = bn_backward_coef(layer.mean, layer.invstd, layer.gamma, total_g, total_g_xhat, layer.count)
    return coef, sum_g_xhat, sum_g


def _affine_grads(layer: _Layer, dgamma, dbeta) -> list[torch.Tensor | None]:
    if layer.gamma is None:  # BatchNorm2d(affine=False)
        return [None, None]
    return [dgamma.to(layer.gamma.dtype), dbeta.to(layer.gamma.dtype)]


def _conv_backward(grad, inp, weight, conv: ConvSpec, need_input: bool, need_weight: bool):
    return convolution_backward(grad, inp, weight, conv.stride, conv.padding, conv.dilation, conv.groups,
                                [need_input, need_weight])


class ResidualBlockTrainFunction(torch.autograd.Function):
    """Inputs: x, the ``TrainPlan``, spec, the process group of synchronized BN (or None), then
    per branch layer (weight, gamma, beta, running_mean, running_var), then the same five for
    the projection (None when there is none)."""

    @staticmethod
    def forward(ctx, x, plan: TrainPlan, spec: BlockSpec, group, *params):
        op = lambda name: op_for(name, plan.backend)  # noqa: E731
        n_layers = len(spec.convs)
        branch = [params[5 * i: 5 * i + 5] for i in range(n_layers)]
        projection = params[5 * n_layers: 5 * n_layers + 5]

        layers: list[_Layer] = []
        h, scale_in, shift_in = x, None, None
        for (weight, gamma, beta, rm, rv), conv, bn in zip(branch, spec.convs, spec.bns):
            layer = _conv_bn_train(op, h, weight, gamma, beta, rm, rv, conv, bn, scale_in, shift_in, group)
            layers.append(layer)
            h, scale_in, shift_in = layer.y, layer.scale, layer.shift

        proj = None
        shortcut, sc_scale, sc_shift = (None if spec.shortcut == "none" else x), None, None
        if spec.shortcut == "projection":
            wd, gd, bd, rmd, rvd = projection
            proj = _conv_bn_train(op, x, wd, gd, bd, rmd, rvd, spec.projection_conv, spec.projection_bn, group=group)
            shortcut, sc_scale, sc_shift = proj.y, proj.scale, proj.shift
        last = layers[-1]
        out = op("bn_add_act")(last.y, last.scale, last.shift, shortcut, sc_scale, sc_shift, spec.shortcut_stride, True)

        saved_layers = layers + ([proj] if proj is not None else [])
        ctx.plan, ctx.spec, ctx.group = plan, spec, group
        ctx.counts = [layer.count for layer in saved_layers]
        ctx.save_for_backward(x, out, *[t for layer in saved_layers for t in layer.tensors()])
        return out

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: create_graph=True raises
    def backward(ctx, grad_out):
        op = lambda name: op_for(name, ctx.plan.backend)  # noqa: E731
        x, out, *flat = ctx.saved_tensors
        width = len(_Layer.TENSORS)
        saved_layers = [_Layer.from_saved(flat[i * width: (i + 1) * width], count) for i, count in enumerate(ctx.counts)]
        grad_out = grad_out.contiguous(memory_format=_CL)
        run = _backward_fused if ctx.plan.fused_backward else _backward_split
        dx, grads = run(op, ctx.spec, ctx.group, ctx.needs_input_grad, x, out, saved_layers, grad_out)
        return (dx, None, None, None, *grads)


def _shortcut_grad(spec: BlockSpec, x, g):
    """The input gradient through an identity or option-A shortcut: the final ReLU's ``g``."""
    if spec.shortcut == "identity":
        return g
    dx = torch.zeros_like(x)
    stride = spec.shortcut_stride
    dx[:, :, ::stride, ::stride] = g[:, : x.shape[1]]
    return dx


def _conv_bn_backward(op, grad, grad_y, coef, inp, layer: _Layer, conv: ConvSpec, prev: _Layer | None,
                      need_input: bool, need_weight: bool):
    scale, shift, mean, invstd = (None,) * 4 if prev is None else (prev.scale, prev.shift, prev.mean, prev.invstd)
    grad_input, grad_weight, sum_g, sum_g_xhat = op("conv_bn_backward")(
        grad, grad_y, coef, inp, layer.weight, scale, shift, mean, invstd,
        conv.stride, conv.padding, conv.dilation, conv.groups, [need_input, need_weight],
    )
    return (grad_input if need_input else None), (grad_weight if need_weight else None), sum_g, sum_g_xhat


def _backward_fused(op, spec: BlockSpec, group, needs, x, out, saved_layers, grad_out):
    """Per conv one ``conv_bn_backward``: BN backward in its prologues, the previous ReLU mask and
    BN reductions in its dgrad epilogue. ``g`` (the final ReLU's gradient) is written once: it is
    the identity shortcut's gradient and the input of the last BN's and the projection's backward."""
    layers = saved_layers[: len(spec.convs)]
    n_layers = len(layers)
    grads: list[torch.Tensor | None] = [None] * (5 * n_layers + 5)
    g = op("bn_act_backward")(grad_out, out, None, True)[0]

    dx = None
    if spec.shortcut in ("identity", "option_a"):
        dx = _shortcut_grad(spec, x, g)
    elif spec.shortcut == "projection":
        proj = saved_layers[-1]
        coef, dgd, dbd = _reduce_to_coef(op, g, proj, group)
        base = 5 * n_layers
        dx, dwd, _, _ = _conv_bn_backward(op, g, proj.y, coef, x, proj, spec.projection_conv, None,
                                          needs[0], needs[4 + base])
        grads[base: base + 3] = [dwd, *_affine_grads(proj, dgd, dbd)]

    # Branch, last layer first. Each conv's dgrad epilogue hands the previous BN its two sums.
    grad, grad_y = g, layers[-1].y
    coef, dgamma, dbeta = _reduce_to_coef(op, g, layers[-1], group)
    for i in range(n_layers - 1, -1, -1):
        layer = layers[i]
        grads[5 * i + 1: 5 * i + 3] = _affine_grads(layer, dgamma, dbeta)
        prev = layers[i - 1] if i > 0 else None
        inp = x if prev is None else prev.y
        need_input = prev is not None or needs[0]
        d_inp, grads[5 * i], sum_g, sum_g_xhat = _conv_bn_backward(
            op, grad, grad_y, coef, inp, layer, spec.convs[i], prev, need_input, needs[4 + 5 * i])
        if prev is not None:
            coef, dgamma, dbeta = _coef_from_sums(prev, sum_g, sum_g_xhat, group)
            grad, grad_y = d_inp, prev.y
        elif needs[0]:
            dx = d_inp if dx is None else dx + d_inp
    return dx, grads


def _backward_split(op, spec: BlockSpec, group, needs, x, out, saved_layers, grad_out):
    """Fused BN reduce/elementwise kernels around ATen's ``convolution_backward``."""
    layers = saved_layers[: len(spec.convs)]
    n_layers = len(layers)
    grads: list[torch.Tensor | None] = [None] * (5 * n_layers + 5)

    # Shortcut: the final ReLU's gradient g flows to it unchanged (identity / option A) or
    # through the projection's BN and conv.
    dx = None
    if spec.shortcut in ("identity", "option_a"):
        dx = _shortcut_grad(spec, x, op("bn_act_backward")(grad_out, out, None, True)[0])
    elif spec.shortcut == "projection":
        proj = saved_layers[-1]
        dyd, dgd, dbd = _bn_grads(op, grad_out, proj, group, act_out=out)
        base = 5 * n_layers
        dx, dwd = _conv_backward(dyd, x, proj.weight, spec.projection_conv, needs[0], needs[4 + base])
        grads[base: base + 3] = [dwd, *_affine_grads(proj, dgd, dbd)]

    # Branch, last layer first: the last BN's ReLU mask is the block output's; the earlier
    # ones are recomputed from the raw conv output (the next conv's prologue).
    dy, dgamma, dbeta = _bn_grads(op, grad_out, layers[-1], group, act_out=out)
    for i in range(n_layers - 1, -1, -1):
        layer = layers[i]
        grads[5 * i + 1: 5 * i + 3] = _affine_grads(layer, dgamma, dbeta)
        if i == 0:
            inp = x
        else:
            prev = layers[i - 1]
            inp = op("bn_add_act")(prev.y, prev.scale, prev.shift, None, None, None, 1, True)
        d_inp, grads[5 * i] = _conv_backward(dy, inp, layer.weight, spec.convs[i], i > 0 or needs[0],
                                             needs[4 + 5 * i])
        if i > 0:
            prev = layers[i - 1]
            dy, dgamma, dbeta = _bn_grads(op, d_inp, prev, group, act_scale=prev.scale, act_shift=prev.shift)
        elif needs[0]:
            dx = d_inp if dx is None else dx + d_inp
    return dx, grads


def residual_block_train(x: torch.Tensor, plan: TrainPlan | str, spec: BlockSpec, group, *params) -> torch.Tensor:
    """Runs one block in train mode; arguments as in ``ResidualBlockTrainFunction`` (a backend
    name means that backend with the fused backward convs)."""
    if isinstance(plan, str):
        plan = TrainPlan(plan)
    return ResidualBlockTrainFunction.apply(x, plan, spec, group, *params)
