// bn_finalize on the CPU: K channels of scalar math (batchnorm.h), far too little to split.
#include "bn_finalize/bn_finalize.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "fusedres/aten_checks.h"
#include "fusedres/batchnorm.h"

namespace fusedres {
namespace {

void check_running_stat(const char* name, const at::Tensor& t, const at::Tensor& mean) {
  constexpr const char* op = "bn_finalize";
  TORCH_CHECK(t.dim() == 1 && t.size(0) == mean.size(0), op, ": ", name, " must have shape (",
              mean.size(0), ",), got ", t.sizes());
  check_same_device(op, name, t, "mean", mean);
  check_activation_dtype(op, name, t);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (it is updated in place)");
}

}  // namespace

BnFinalizeOperands prepare_bn_finalize(const at::Tensor& mean, const at::Tensor& m2,
                                       int64_t count, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& running_mean,
                                       const std::optional<at::Tensor>& running_var) {
  constexpr const char* op = "bn_finalize";
  TORCH_CHECK(mean.dim() == 1, op, ": mean must be 1-D (one value per channel), got ",
              mean.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat, op, ": mean must be float32, got ",
              mean.scalar_type());
  check_like(op, "m2", m2, "mean", mean);
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
  const int64_t K = mean.size(0);

  BnFinalizeOperands ops{mean.contiguous(), m2.contiguous()};
  ops.weight = per_channel_fp32(op, "weight", weight, K, "mean", mean);
  ops.bias = per_channel_fp32(op, "bias", bias, K, "mean", mean);
  ops.count = count;
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  if (running_mean.has_value()) {
    check_running_stat("running_mean", *running_mean, mean);
    check_running_stat("running_var", *running_var, mean);
    TORCH_CHECK(running_var->scalar_type() == running_mean->scalar_type(), op,
                ": running_var dtype ", running_var->scalar_type(),
                " does not match running_mean dtype ", running_mean->scalar_type());
    ops.running_mean = *running_mean;
    ops.running_var = *running_var;
  }
  return ops;
}

namespace {

template <typename running_t>
void bn_finalize_kernel(const BnFinalizeOperands& ops, float momentum, float eps, float* scale,
                        float* shift, float* invstd) {
  const float* mean = ops.mean.const_data_ptr<float>();
  const float* m2 = ops.m2.const_data_ptr<float>();
  const float* weight = optional_data<float>(ops.weight);
  const float* bias = optional_data<float>(ops.bias);
  running_t* running_mean =
      ops.running_mean.defined() ? ops.running_mean.mutable_data_ptr<running_t>() : nullptr;
  running_t* running_var =
      ops.running_var.defined() ? ops.running_var.mutable_data_ptr<running_t>() : nullptr;
  for (int64_t k = 0; k < ops.mean.size(0); ++k) {
    const BnChannelAffine a = bn_batch_affine(mean[k], m2[k], ops.count, weight ? weight[k] : 1.f,
                                              bias ? bias[k] : 0.f, eps);
    scale[k] = a.scale;
    shift[k] = a.shift;
    invstd[k] = a.invstd;
    if (running_mean != nullptr) {
      running_mean[k] = static_cast<running_t>(
          running_stat_update(static_cast<float>(running_mean[k]), mean[k], momentum));
      running_var[k] = static_cast<running_t>(running_stat_update(
          static_cast<float>(running_var[k]), unbiased_variance(m2[k], ops.count), momentum));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_finalize_cpu(
    const at::Tensor& mean, const at::Tensor& m2, int64_t count,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps) {
  auto ops = prepare_bn_finalize(mean, m2, count, weight, bias, running_mean, running_var);
  at::Tensor scale = at::empty_like(ops.mean);
  at::Tensor shift = at::empty_like(ops.mean);
  at::Tensor invstd = at::empty_like(ops.mean);
  const auto running_dtype =
      ops.running_mean.defined() ? ops.running_mean.scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_dtype, "bn_finalize_cpu", [&] {
    bn_finalize_kernel<scalar_t>(ops, static_cast<float>(momentum), static_cast<float>(eps),
                                 scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>(),
                                 invstd.mutable_data_ptr<float>());
  });
  return {scale, shift, invstd};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) { m.impl("bn_finalize", &fusedres::bn_finalize_cpu); }
