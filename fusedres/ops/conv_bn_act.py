"""``conv_bn_act``: ``act(conv(x, W) * scale + shift [+ residual])`` in one launch.

The residual has the output's shape, or is a block's option-A shortcut (its input, read with a
stride, channels past its own zero), indexed in the epilogue without being materialised.

The C++ op ``fusedres::conv_bn_act`` (CPU and CUDA kernels) is declared in csrc/ops.cpp and gets
its fake impl here; the Triton kernel is the custom op ``fusedres::conv_bn_act_triton``.
``conv_bn_act`` below is the public, differentiable entry point: it validates, picks the
backend (fusedres.backends) and runs the fused forward; backward runs the fused epilogue
gradient (``bn_act_backward``) and ATen's ``convolution_backward`` for the two GEMMs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from fusedres import backends
from fusedres.ops import _ref
from fusedres.ops._aten import convolution_backward
from fusedres.ops._dispatch import kernel_for, register_fake_for_cpp, register_triton
from fusedres.ops._validate import canonical_layout, check_conv_bn_act, pair
from fusedres.ops.bn_act_backward import bn_act_backward

_CL = torch.channels_last


def _fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, residual_stride=1):
    n, k = x.shape[0], weight.shape[0]
    p = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    q = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return torch.empty((n, k, p, q), dtype=x.dtype, device=x.device, memory_format=_CL)


register_fake_for_cpp("conv_bn_act", _fake)


@torch.library.custom_op("fusedres::conv_bn_act_triton", mutates_args=())
def conv_bn_act_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    residual_stride: int = 1,
) -> torch.Tensor:
    from fusedres.triton import conv_bn_act as kernel

    return kernel.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu,
                              residual_stride)


conv_bn_act_triton.register_fake(_fake)
register_triton("conv_bn_act", conv_bn_act_triton)


def _forward(backend: str, *args):
    """The backend's kernel on operands ``conv_bn_act`` has validated."""
    return kernel_for("conv_bn_act", backend)(*args)


class ConvBnActFunction(torch.autograd.Function):
    """Fused forward; backward = fused epilogue gradient + ATen's convolution_backward.

    Saves x, weight, scale and the output (for the ReLU mask): no intermediate activation.
    ``grad_scale[k] = sum(g * conv(x, W))[k]`` needs no saved or recomputed conv output: it
    equals ``sum(W[k] * dW_g[k])`` with ``dW_g`` the weight gradient for the unscaled ``g``,
    which the weight gradient needs anyway (``grad_W = dW_g * scale``).
    """

    @staticmethod
    def forward(ctx, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu,
                residual_stride, backend):
        out = _forward(backend, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu,
                       residual_stride)
        ctx.save_for_backward(x, weight, scale, out)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.relu = relu
        ctx.backend = backend
        ctx.shift_dtype = None if shift is None else shift.dtype
        ctx.residual_shape = None if residual is None else residual.shape
        ctx.residual_stride = residual_stride
        return out

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: create_graph=True raises
    def backward(ctx, grad_out):
        x, weight, scale, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_w, need_scale, need_shift, need_residual = ctx.needs_input_grad[:5]

        acc = torch.promote_types(weight.dtype, torch.float32)  # fp64 stays fp64

        def conv_backward(grad, w, masks):
            return convolution_backward(grad, x, w, stride, padding, dilation, groups, masks)

        grad_x = grad_w = grad_scale = None
        if scale is None or not need_scale:
            # g * scale comes out of the epilogue kernel; without a scale it is g itself.
            grad_conv, grad_shift = bn_act_backward(grad_out, out, scale, ctx.relu, ctx.backend)
            g = grad_conv if scale is None else None
            if need_x or need_w:
                grad_x, grad_w = conv_backward(grad_conv, weight, [need_x, need_w])
        else:
            g, grad_shift = bn_act_backward(grad_out, out, None, ctx.relu, ctx.backend)
            per_filter = scale.view(-1, 1, 1, 1)
            if need_x:
                scaled_weight = (weight.to(acc) * per_filter.to(acc)).to(weight.dtype)
                grad_x = conv_backward(g, scaled_weight, [True, False])[0]
            # In the accumulation dtype: grad_scale sums dw_g * W over a filter, terms that cancel;
            # dw_g rounded to fp16/bf16 first gave 3x eager's error (found by tests/test_fuzz.py).
            dw_g = convolution_backward(g.to(acc), x.to(acc), weight.to(acc), stride, padding, dilation, groups,
                                        [False, True])[1]
            grad_scale = (dw_g * weight.to(acc)).sum(dim=(1, 2, 3))
            if need_w:
                grad_w = (dw_g.to(acc) * per_filter.to(acc)).to(weight.dtype)
        grad_residual = None
        if need_residual:
            if g is None:  # the scaled gradient was produced; the residual needs the unscaled one
                g = bn_act_backward(grad_out, out, None, ctx.relu, ctx.backend)[0]
            grad_residual = _scatter_to_residual(g, ctx.residual_shape, ctx.residual_stride)
        return (
            grad_x,
            grad_w,
            grad_scale.to(scale.dtype) if need_scale else None,
            grad_shift.to(ctx.shift_dtype) if need_shift else None,
            grad_residual,
            None, None, None, None, None, None, None,
        )


def _scatter_to_residual(g: torch.Tensor, shape: torch.Size, stride: int) -> torch.Tensor:
    """The residual's gradient from the epilogue's ``g`` (output-shaped): ``g`` itself when the
    residual has the output's shape, else scattered back where option A read it (zero elsewhere)."""
    if shape == g.shape:
        return g
    grad = torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=_CL).zero_()
    grad[:, :, ::stride, ::stride] = g[:, : shape[1]]
    return grad


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    relu: bool = True,
    backend: str | None = None,
    *,
    residual_stride: int = 1,
) -> torch.Tensor:
    """``act(conv2d(x, weight) * scale + shift + residual)`` with the epilogue fused into the conv.

    ``scale``/``shift`` are per output channel (None: 1 / 0), ``relu`` selects ReLU or identity.
    ``residual`` has the output's shape (N, K, P, Q), or is an option-A shortcut (N, Cr, Hr, Wr)
    with Cr <= K, read at ``[n, k, p * residual_stride, q * residual_stride]`` for k < Cr and 0
    for the other channels. Returns a ``torch.channels_last`` tensor of ``x.dtype``.
    ``backend``: 'auto', 'native', 'triton' or 'reference' (None: the default, see
    ``fusedres.set_default_backend``). Differentiable in every tensor argument.
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    check_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, residual_stride)
    x, weight = canonical_layout(x), canonical_layout(weight)  # see canonical_layout: oneDNN
    args = (x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, residual_stride)
    chosen = backends.resolve_named(backend, x.device, x.dtype)
    if chosen is None:  # auto: the tune key is built only here
        tune_key = ("conv_bn_act", backends.tensor_key((x, weight, residual)), stride, padding,
                    dilation, groups, relu, scale is None, shift is None, residual_stride)
        chosen = backends.resolve("auto", x.device, x.dtype, tune_key, lambda b: _forward(b, *args))
    if chosen == "reference":
        return _ref.conv_bn_act(*args)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in args[:5]):
        return _forward(chosen, *args)  # inference: no autograd node to build
    return ConvBnActFunction.apply(*args, chosen)
