// conv_bn_stats on CUDA: validation shared with the CPU kernel, then the implicit-GEMM conv with
// the BN+ReLU prologue and the statistics epilogue of conv_bn_stats_cuda.cu.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "conv_bn_stats/conv_bn_stats.h"
#include "fusedres/aten_checks.h"
#include "fusedres/cuda_glue.h"

namespace fusedres {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale_in,
    const std::optional<at::Tensor>& shift_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto ops = prepare_conv_bn_stats(x, weight, scale_in, shift_in, stride, padding, dilation,
                                   groups);
  at::Tensor y = empty_conv_output(ops);
  at::Tensor mean = empty_channel_stats(ops);
  at::Tensor m2 = empty_channel_stats(ops);
  if (ops.geom.K == 0) return {y, mean, m2};
  const int64_t partials = cuda::conv_bn_stats_num_partials(ops.geom);
  at::Tensor workspace = at::empty({2 * partials * ops.geom.K}, mean.options());

  cuda::ConvBnStatsArgs args{};
  args.geom = ops.geom;
  args.dtype = cuda::dtype_of(ops.x);
  args.x = ops.x.const_data_ptr();
  args.weight = ops.weight.const_data_ptr();
  args.scale_in = optional_data<float>(ops.scale_in);
  args.shift_in = optional_data<float>(ops.shift_in);
  args.y = y.mutable_data_ptr();
  args.mean = mean.mutable_data_ptr<float>();
  args.m2 = m2.mutable_data_ptr<float>();
  args.workspace = workspace.mutable_data_ptr<float>();
  args.allow_tf32 = cuda::conv_allows_tf32();
  cuda::check_launch(cuda::launch_conv_bn_stats(args, c10::cuda::getCurrentCUDAStream()),
                     "conv_bn_stats");
  return {y, mean, m2};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) { m.impl("conv_bn_stats", &fusedres::conv_bn_stats_cuda); }
