// ATen-side helpers of conv_bn_act shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "fusedres/conv_geometry.h"

namespace fusedres {

// The op's operands after validation, in the layouts the kernels read: NHWC activations, KRSC
// weight, fp32 per-channel affine (undefined when absent).
struct ConvBnActOperands {
  at::Tensor x;
  at::Tensor weight;
  at::Tensor scale;
  at::Tensor shift;
  at::Tensor residual;
  ConvGeometry geom;
};

ConvBnActOperands prepare_conv_bn_act(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift,
                                      const std::optional<at::Tensor>& residual,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups);

// (N, K, P, Q) in channels_last, the layout every backend returns.
at::Tensor empty_conv_output(const ConvBnActOperands& ops);

}  // namespace fusedres
