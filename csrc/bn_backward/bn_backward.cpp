// Train-mode BatchNorm(+ReLU) backward on the CPU.
// bn_backward_reduce: one parallel pass over row slabs with per-slab channel sums in double (as
// ATen's CPU BatchNorm accumulates), added in slab order afterwards (deterministic: the slabs
// depend on the shape alone).
// bn_backward_elemt: per-channel constants once, then one parallel elementwise pass.
#include "bn_backward/bn_backward.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "fusedres/aten_checks.h"
#include "fusedres/cpu_parallel.h"

namespace fusedres {

BnBackwardOperands prepare_bn_backward(const char* op, const at::Tensor& grad, const at::Tensor& y,
                                       const at::Tensor& mean, const at::Tensor& invstd,
                                       const std::optional<at::Tensor>& act_out,
                                       const std::optional<at::Tensor>& act_scale,
                                       const std::optional<at::Tensor>& act_shift) {
  TORCH_CHECK(y.dim() == 4, op, ": y must be 4-D (N, K, P, Q), got ", y.dim(), "-D");
  check_activation_dtype(op, "y", y);
  check_like(op, "grad", grad, "y", y);
  const int64_t K = y.size(1);
  const auto cl = at::MemoryFormat::ChannelsLast;

  BnBackwardOperands ops{grad.contiguous(cl), y.contiguous(cl)};
  ops.mean = per_channel_fp32(op, "mean", mean, K, "y", y);
  ops.invstd = per_channel_fp32(op, "invstd", invstd, K, "y", y);
  if (act_out.has_value()) {
    check_like(op, "act_out", *act_out, "y", y);
    ops.act_out = act_out->contiguous(cl);
  }
  ops.act_scale = per_channel_fp32(op, "act_scale", act_scale, K, "y", y);
  ops.act_shift = per_channel_fp32(op, "act_shift", act_shift, K, "y", y);
  check_both_or_neither(op, "act_scale", ops.act_scale, "act_shift", ops.act_shift);
  ops.rows = y.size(0) * y.size(2) * y.size(3);
  ops.channels = K;
  return ops;
}

BnBackwardElemtOperands prepare_bn_backward_elemt(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_g,
    const at::Tensor& sum_g_xhat, int64_t count, const std::optional<at::Tensor>& act_out,
    const std::optional<at::Tensor>& act_scale, const std::optional<at::Tensor>& act_shift) {
  constexpr const char* op = "bn_backward_elemt";
  BnBackwardElemtOperands ops{
      prepare_bn_backward(op, grad, y, mean, invstd, act_out, act_scale, act_shift)};
  ops.weight = per_channel_fp32(op, "weight", weight, ops.channels, "y", y);
  ops.sum_g = per_channel_fp32(op, "sum_g", sum_g, ops.channels, "y", y);
  ops.sum_g_xhat = per_channel_fp32(op, "sum_g_xhat", sum_g_xhat, ops.channels, "y", y);
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
  ops.count = count;
  return ops;
}

namespace {

// The mask operands of one element (unused ones are never read).
template <typename scalar_t, ReluMask kMask>
float masked_grad(const scalar_t* grad, const scalar_t* y, const scalar_t* act_out,
                  const float* act_scale, const float* act_shift, int64_t offset, int64_t k) {
  return relu_masked_grad<kMask>(
      static_cast<float>(grad[offset]), static_cast<float>(y[offset]),
      kMask == ReluMask::kFromOutput ? static_cast<float>(act_out[offset]) : 0.f,
      kMask == ReluMask::kFromPrologue ? act_scale[k] : 0.f,
      kMask == ReluMask::kFromPrologue ? act_shift[k] : 0.f);
}

template <typename scalar_t, ReluMask kMask>
void bn_backward_reduce_kernel(const BnBackwardOperands& ops, float* sum_g, float* sum_g_xhat) {
  const int64_t rows = ops.rows;
  const int64_t K = ops.channels;
  const scalar_t* grad = ops.grad.const_data_ptr<scalar_t>();
  const scalar_t* y = ops.y.const_data_ptr<scalar_t>();
  const scalar_t* act_out = optional_data<scalar_t>(ops.act_out);
  const float* act_scale = optional_data<float>(ops.act_scale);
  const float* act_shift = optional_data<float>(ops.act_shift);
  const float* mean = ops.mean.const_data_ptr<float>();

  // sum(g) and sum(g * (y - mean)); invstd is applied once per channel at the end.
  const std::vector<double> sums =
      deterministic_channel_sums<2>(rows, K, [&](int64_t row, double* slab) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = row * K + k;
          const float g =
              masked_grad<scalar_t, kMask>(grad, y, act_out, act_scale, act_shift, i, k);
          slab[k] += g;
          slab[K + k] += static_cast<double>(g) * (static_cast<float>(y[i]) - mean[k]);
        }
      });
  const float* invstd = ops.invstd.const_data_ptr<float>();
  for (int64_t k = 0; k < K; ++k) {
    sum_g[k] = static_cast<float>(sums[k]);
    sum_g_xhat[k] = static_cast<float>(sums[K + k] * invstd[k]);
  }
}

template <typename scalar_t, ReluMask kMask>
void bn_backward_elemt_kernel(const BnBackwardElemtOperands& ops, scalar_t* grad_input) {
  const int64_t K = ops.channels;
  const scalar_t* grad = ops.grad.const_data_ptr<scalar_t>();
  const scalar_t* y = ops.y.const_data_ptr<scalar_t>();
  const scalar_t* act_out = optional_data<scalar_t>(ops.act_out);
  const float* act_scale = optional_data<float>(ops.act_scale);
  const float* act_shift = optional_data<float>(ops.act_shift);
  const float* mean = ops.mean.const_data_ptr<float>();
  const float* invstd = ops.invstd.const_data_ptr<float>();
  const float* weight = optional_data<float>(ops.weight);
  const float* sum_g = ops.sum_g.const_data_ptr<float>();
  const float* sum_g_xhat = ops.sum_g_xhat.const_data_ptr<float>();

  const float inv_count = 1.f / static_cast<float>(ops.count);
  std::vector<BnBackwardChannel> coef(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    coef[k] = bn_backward_channel(mean[k], invstd[k], weight ? weight[k] : 1.f, sum_g[k],
                                  sum_g_xhat[k], inv_count);
  }
  at::parallel_for(0, ops.rows, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = row * K + k;
        const float g = masked_grad<scalar_t, kMask>(grad, y, act_out, act_scale, act_shift, i, k);
        grad_input[i] =
            static_cast<scalar_t>(bn_backward_elem(g, static_cast<float>(y[i]), coef[k]));
      }
    }
  });
}

// Calls fn(std::integral_constant<ReluMask, mask>) for the runtime mask.
template <typename Fn>
void dispatch_mask(ReluMask mask, Fn&& fn) {
  switch (mask) {
    case ReluMask::kNone:
      return fn(std::integral_constant<ReluMask, ReluMask::kNone>{});
    case ReluMask::kFromOutput:
      return fn(std::integral_constant<ReluMask, ReluMask::kFromOutput>{});
    case ReluMask::kFromPrologue:
      return fn(std::integral_constant<ReluMask, ReluMask::kFromPrologue>{});
  }
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& act_out, const std::optional<at::Tensor>& act_scale,
    const std::optional<at::Tensor>& act_shift) {
  auto ops = prepare_bn_backward("bn_backward_reduce", grad, y, mean, invstd, act_out, act_scale,
                                 act_shift);
  at::Tensor sum_g = at::empty_like(ops.mean);
  at::Tensor sum_g_xhat = at::empty_like(ops.mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.y.scalar_type(),
                                  "bn_backward_reduce_cpu", [&] {
    dispatch_mask(ops.mask(), [&](auto mask) {
      bn_backward_reduce_kernel<scalar_t, decltype(mask)::value>(
          ops, sum_g.mutable_data_ptr<float>(), sum_g_xhat.mutable_data_ptr<float>());
    });
  });
  return {sum_g, sum_g_xhat};
}

at::Tensor bn_backward_elemt_cpu(const at::Tensor& grad, const at::Tensor& y,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const std::optional<at::Tensor>& weight,
                                 const at::Tensor& sum_g, const at::Tensor& sum_g_xhat,
                                 int64_t count, const std::optional<at::Tensor>& act_out,
                                 const std::optional<at::Tensor>& act_scale,
                                 const std::optional<at::Tensor>& act_shift) {
  auto ops = prepare_bn_backward_elemt(grad, y, mean, invstd, weight, sum_g, sum_g_xhat, count,
                                       act_out, act_scale, act_shift);
  at::Tensor grad_input = at::empty_like(ops.y, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.y.scalar_type(),
                                  "bn_backward_elemt_cpu", [&] {
    dispatch_mask(ops.mask(), [&](auto mask) {
      bn_backward_elemt_kernel<scalar_t, decltype(mask)::value>(
          ops, grad_input.mutable_data_ptr<scalar_t>());
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("bn_backward_reduce", &fusedres::bn_backward_reduce_cpu);
  m.impl("bn_backward_elemt", &fusedres::bn_backward_elemt_cpu);
}
