// bn_finalize on CUDA: validation shared with the CPU kernel, then one thread per channel.
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_finalize/bn_finalize.h"
#include "fusedres/aten_checks.h"
#include "fusedres/cuda_glue.h"

namespace fusedres {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_finalize_cuda(
    const at::Tensor& mean, const at::Tensor& m2, int64_t count,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps) {
  const c10::cuda::CUDAGuard device_guard(mean.device());
  auto ops = prepare_bn_finalize(mean, m2, count, weight, bias, running_mean, running_var);
  at::Tensor scale = at::empty_like(ops.mean);
  at::Tensor shift = at::empty_like(ops.mean);
  at::Tensor invstd = at::empty_like(ops.mean);

  cuda::BnFinalizeArgs args{};
  args.channels = ops.mean.size(0);
  args.count = ops.count;
  args.mean = ops.mean.const_data_ptr<float>();
  args.m2 = ops.m2.const_data_ptr<float>();
  args.weight = optional_data<float>(ops.weight);
  args.bias = optional_data<float>(ops.bias);
  const bool tracked = ops.running_mean.defined();
  args.running_mean = tracked ? ops.running_mean.mutable_data_ptr() : nullptr;
  args.running_var = tracked ? ops.running_var.mutable_data_ptr() : nullptr;
  args.running_dtype = tracked ? cuda::dtype_of(ops.running_mean) : cuda::DType::kFloat32;
  args.momentum = static_cast<float>(momentum);
  args.eps = static_cast<float>(eps);
  args.scale = scale.mutable_data_ptr<float>();
  args.shift = shift.mutable_data_ptr<float>();
  args.invstd = invstd.mutable_data_ptr<float>();
  cuda::check_launch(cuda::launch_bn_finalize(args, c10::cuda::getCurrentCUDAStream()),
                     "bn_finalize");
  return {scale, shift, invstd};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) { m.impl("bn_finalize", &fusedres::bn_finalize_cuda); }
