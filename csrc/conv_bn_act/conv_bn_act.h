// ATen-side helpers of conv_bn_act, shared by its CPU kernel and CUDA glue and by conv_bn_stats.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "fusedres/conv_geometry.h"

namespace fusedres {

// A convolution's operands after validation, in the layouts the kernels read: NHWC activations
// and KRSC weight.
struct ConvOperands {
  at::Tensor x;
  at::Tensor weight;
  ConvGeometry geom;
};

// Checks x, weight and the convolution parameters; `op` prefixes every error message.
ConvOperands prepare_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups);

// conv_bn_act's operands: the convolution's, plus the fp32 per-output-channel affine and the
// channels_last residual (each undefined when absent), and where each output element reads its
// residual: the output's own shape, or option A's strided, narrower shortcut.
struct ConvBnActOperands : ConvOperands {
  at::Tensor scale;
  at::Tensor shift;
  at::Tensor residual;
  ShortcutGeometry residual_geom;
};

ConvBnActOperands prepare_conv_bn_act(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift,
                                      const std::optional<at::Tensor>& residual,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups,
                                      int64_t residual_stride);

// (N, K, P, Q) in channels_last and x's dtype, the layout every backend returns.
at::Tensor empty_conv_output(const ConvOperands& ops);

// The CPU kernels' main loop: ATen's convolution (oneDNN) of an fp32 NHWC input with the weight
// in fp32, so reduced precision is rounded once, after the epilogue, as on the GPU. Returns the
// fp32 output in channels_last.
at::Tensor convolution_fp32_cpu(const ConvOperands& ops, const at::Tensor& input_fp32);

}  // namespace fusedres
