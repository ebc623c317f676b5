// ATen-side helpers of bn_act_backward shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedres {

// Operands after validation: activations (N, K, P, Q) channels_last, scale fp32 or undefined.
struct BnActBackwardOperands {
  at::Tensor grad_out;
  at::Tensor out;
  at::Tensor scale;
  int64_t rows;      // N * P * Q
  int64_t channels;  // K
};

BnActBackwardOperands prepare_bn_act_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                              const std::optional<at::Tensor>& scale);

}  // namespace fusedres
