// ATen-side helpers of conv_bn_stats shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "conv_bn_act/conv_bn_act.h"

namespace fusedres {

// The convolution's operands plus the prologue's fp32 per-input-channel affine (both undefined
// when x is convolved as stored).
struct ConvBnStatsOperands : ConvOperands {
  at::Tensor scale_in;
  at::Tensor shift_in;
};

ConvBnStatsOperands prepare_conv_bn_stats(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& scale_in,
                                          const std::optional<at::Tensor>& shift_in,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation, int64_t groups);

// The CPU kernels' prologue: relu(x * scale + shift) of a channels_last x with fp32 (C,) scale
// and shift, rounded to x's dtype (as the reference stores the activation), as fp32 NHWC.
at::Tensor bn_relu_input_fp32_cpu(const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& shift);

// An fp32 (K,) tensor for per-channel statistics, on x's device.
at::Tensor empty_channel_stats(const ConvOperands& ops);

}  // namespace fusedres
