// ATen-side helpers of bn_finalize shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedres {

// Operands after validation: fp32 (K,) statistics and affine parameters (undefined when absent),
// and the running statistics as given (updated in place; undefined when not tracked).
struct BnFinalizeOperands {
  at::Tensor mean;
  at::Tensor m2;
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor running_mean;
  at::Tensor running_var;
  int64_t count;
};

BnFinalizeOperands prepare_bn_finalize(const at::Tensor& mean, const at::Tensor& m2,
                                       int64_t count, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& running_mean,
                                       const std::optional<at::Tensor>& running_var);

}  // namespace fusedres
