// ATen-side helpers of conv_bn_backward shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "conv_bn_stats/conv_bn_stats.h"

namespace fusedres {

// The forward conv's operands (x, weight, the previous BN+ReLU's scale_in/shift_in), plus:
//   grad       dL/d(conv output) or, with grad_coef, this layer's BN-output gradient; NHWC.
//   grad_y     this layer's raw conv output (the BN input), NHWC; undefined without grad_coef.
//   grad_coef  fp32 (4, K) contiguous rows (mean, grad_scale, mean_g, xhat_coef), BnBackwardChannel
//              per channel: dy = bn_backward_elem(grad, grad_y) (batchnorm.h).
//   mean_in, invstd_in  fp32 (C,) statistics of the previous BN, for sum(g * xhat).
// mean_in/invstd_in are defined exactly when scale_in/shift_in are.
struct ConvBnBackwardOperands : ConvBnStatsOperands {
  at::Tensor grad;
  at::Tensor grad_y;
  at::Tensor grad_coef;
  at::Tensor mean_in;
  at::Tensor invstd_in;
  bool need_input = false;
  bool need_weight = false;
  // The dgrad epilogue reduces the previous BN's backward sums (scale_in given, dgrad asked).
  bool with_sums() const { return need_input && scale_in.defined(); }
};

ConvBnBackwardOperands prepare_conv_bn_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_y,
    const std::optional<at::Tensor>& grad_coef, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& shift_in,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& invstd_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 2> output_mask);

// The four outputs, allocated: grad_input (x's shape and dtype, channels_last) and grad_weight
// (weight's shape and dtype, contiguous KCRS) or empty when not asked for; sum_g/sum_g_xhat fp32
// (C,) when with_sums(), else empty.
struct ConvBnBackwardOutputs {
  at::Tensor grad_input, grad_weight, sum_g, sum_g_xhat;
};
ConvBnBackwardOutputs empty_conv_bn_backward_outputs(const ConvBnBackwardOperands& ops);

}  // namespace fusedres
