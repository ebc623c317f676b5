// ATen-side helpers of bn_backward_reduce / bn_backward_elemt shared by the CPU kernels and the
// CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "fusedres/batchnorm.h"

namespace fusedres {

// Operands common to both ops after validation: activations (N, K, P, Q) channels_last,
// per-channel vectors fp32, and the ReLU mask's source (act_* undefined when absent).
struct BnBackwardOperands {
  at::Tensor grad;
  at::Tensor y;
  at::Tensor mean;
  at::Tensor invstd;
  at::Tensor act_out;
  at::Tensor act_scale;
  at::Tensor act_shift;
  int64_t rows;      // N * P * Q
  int64_t channels;  // K

  // The saved output wins when both sources are given, as in the reference.
  ReluMask mask() const {
    if (act_out.defined()) return ReluMask::kFromOutput;
    return act_scale.defined() ? ReluMask::kFromPrologue : ReluMask::kNone;
  }
};

BnBackwardOperands prepare_bn_backward(const char* op, const at::Tensor& grad, const at::Tensor& y,
                                       const at::Tensor& mean, const at::Tensor& invstd,
                                       const std::optional<at::Tensor>& act_out,
                                       const std::optional<at::Tensor>& act_scale,
                                       const std::optional<at::Tensor>& act_shift);

// bn_backward_elemt's further operands: fp32 per-channel weight (undefined when absent) and the
// two sums of bn_backward_reduce, over `count` values per channel.
struct BnBackwardElemtOperands : BnBackwardOperands {
  at::Tensor weight;
  at::Tensor sum_g;
  at::Tensor sum_g_xhat;
  int64_t count;
};

BnBackwardElemtOperands prepare_bn_backward_elemt(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_g,
    const at::Tensor& sum_g_xhat, int64_t count, const std::optional<at::Tensor>& act_out,
    const std::optional<at::Tensor>& act_scale, const std::optional<at::Tensor>& act_shift);

}  // namespace fusedres
