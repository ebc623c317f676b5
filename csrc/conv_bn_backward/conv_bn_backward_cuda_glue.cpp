// conv_bn_backward on CUDA: validation shared with the CPU kernel, then the dgrad and wgrad
// implicit GEMMs (with their deterministic second-stage reductions) of conv_bn_backward_cuda.cu.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "conv_bn_backward/conv_bn_backward.h"
#include "fusedres/aten_checks.h"
#include "fusedres/cuda_glue.h"

namespace fusedres {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_backward_cuda(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_y,
    const std::optional<at::Tensor>& grad_coef, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& shift_in,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& invstd_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto ops = prepare_conv_bn_backward(grad, grad_y, grad_coef, x, weight, scale_in,
                                            shift_in, mean_in, invstd_in, stride, padding,
                                            dilation, groups, output_mask);
  auto out = empty_conv_bn_backward_outputs(ops);
  if (!ops.need_input && !ops.need_weight) {
    return {out.grad_input, out.grad_weight, out.sum_g, out.sum_g_xhat};
  }
  const bool with_sums = ops.with_sums();
  const int64_t workspace_floats =
      cuda::conv_bn_backward_workspace_floats(ops.geom, with_sums, ops.need_weight);
  at::Tensor workspace = at::empty({workspace_floats}, x.options().dtype(at::kFloat));

  cuda::ConvBnBackwardArgs args{};
  args.geom = ops.geom;
  args.dtype = cuda::dtype_of(ops.x);
  args.grad = ops.grad.const_data_ptr();
  // grad_y is read only through grad_coef's prologue.
  args.grad_y = ops.grad_coef.defined() ? optional_data(ops.grad_y) : nullptr;
  args.grad_coef = optional_data<float>(ops.grad_coef);
  args.x = ops.x.const_data_ptr();
  args.weight = ops.weight.const_data_ptr();
  args.scale_in = optional_data<float>(ops.scale_in);
  args.shift_in = optional_data<float>(ops.shift_in);
  args.mean_in = with_sums ? optional_data<float>(ops.mean_in) : nullptr;
  args.invstd_in = with_sums ? optional_data<float>(ops.invstd_in) : nullptr;
  args.grad_input = ops.need_input ? out.grad_input.mutable_data_ptr() : nullptr;
  args.grad_weight = ops.need_weight ? out.grad_weight.mutable_data_ptr() : nullptr;
  args.sum_g = with_sums ? out.sum_g.mutable_data_ptr<float>() : nullptr;
  args.sum_g_xhat = with_sums ? out.sum_g_xhat.mutable_data_ptr<float>() : nullptr;
  args.workspace = workspace_floats > 0 ? workspace.mutable_data_ptr<float>() : nullptr;
  args.allow_tf32 = cuda::conv_allows_tf32();
  cuda::check_launch(cuda::launch_conv_bn_backward(args, c10::cuda::getCurrentCUDAStream()),
                     "conv_bn_backward");
  return {out.grad_input, out.grad_weight, out.sum_g, out.sum_g_xhat};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("conv_bn_backward", &fusedres::conv_bn_backward_cuda);
}
