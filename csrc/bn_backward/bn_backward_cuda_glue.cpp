// Train-mode BatchNorm(+ReLU) backward on CUDA: validation shared with the CPU kernels, then the
// two-stage deterministic reduction and the elementwise kernel of bn_backward_cuda.cu.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_backward/bn_backward.h"
#include "fusedres/aten_checks.h"
#include "fusedres/cuda_glue.h"

namespace fusedres {
namespace {

cuda::ReluMaskOperands mask_operands(const BnBackwardOperands& ops) {
  return {optional_data(ops.act_out), optional_data<float>(ops.act_scale),
          optional_data<float>(ops.act_shift)};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& act_out, const std::optional<at::Tensor>& act_scale,
    const std::optional<at::Tensor>& act_shift) {
  const c10::cuda::CUDAGuard device_guard(y.device());
  auto ops = prepare_bn_backward("bn_backward_reduce", grad, y, mean, invstd, act_out, act_scale,
                                 act_shift);
  at::Tensor sum_g = at::empty_like(ops.mean);
  at::Tensor sum_g_xhat = at::empty_like(ops.mean);
  if (ops.channels == 0) return {sum_g, sum_g_xhat};
  const int64_t partials = cuda::bn_backward_num_partials(ops.rows);
  at::Tensor workspace = at::empty({2 * partials * ops.channels}, ops.mean.options());

  cuda::BnBackwardReduceArgs args{};
  args.rows = ops.rows;
  args.channels = ops.channels;
  args.dtype = cuda::dtype_of(ops.y);
  args.grad = ops.grad.const_data_ptr();
  args.y = ops.y.const_data_ptr();
  args.mean = ops.mean.const_data_ptr<float>();
  args.invstd = ops.invstd.const_data_ptr<float>();
  args.mask = mask_operands(ops);
  args.sum_g = sum_g.mutable_data_ptr<float>();
  args.sum_g_xhat = sum_g_xhat.mutable_data_ptr<float>();
  args.workspace = workspace.mutable_data_ptr<float>();
  cuda::check_launch(cuda::launch_bn_backward_reduce(args, c10::cuda::getCurrentCUDAStream()),
                     "bn_backward_reduce");
  return {sum_g, sum_g_xhat};
}

at::Tensor bn_backward_elemt_cuda(const at::Tensor& grad, const at::Tensor& y,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  const std::optional<at::Tensor>& weight,
                                  const at::Tensor& sum_g, const at::Tensor& sum_g_xhat,
                                  int64_t count, const std::optional<at::Tensor>& act_out,
                                  const std::optional<at::Tensor>& act_scale,
                                  const std::optional<at::Tensor>& act_shift) {
  const c10::cuda::CUDAGuard device_guard(y.device());
  auto ops = prepare_bn_backward_elemt(grad, y, mean, invstd, weight, sum_g, sum_g_xhat, count,
                                       act_out, act_scale, act_shift);
  at::Tensor grad_input = at::empty_like(ops.y, at::MemoryFormat::ChannelsLast);
  if (grad_input.numel() == 0) return grad_input;

  cuda::BnBackwardElemtArgs args{};
  args.rows = ops.rows;
  args.channels = ops.channels;
  args.dtype = cuda::dtype_of(ops.y);
  args.grad = ops.grad.const_data_ptr();
  args.y = ops.y.const_data_ptr();
  args.mean = ops.mean.const_data_ptr<float>();
  args.invstd = ops.invstd.const_data_ptr<float>();
  args.weight = optional_data<float>(ops.weight);
  args.sum_g = ops.sum_g.const_data_ptr<float>();
  args.sum_g_xhat = ops.sum_g_xhat.const_data_ptr<float>();
  args.count = ops.count;
  args.mask = mask_operands(ops);
  args.grad_input = grad_input.mutable_data_ptr();
  cuda::check_launch(cuda::launch_bn_backward_elemt(args, c10::cuda::getCurrentCUDAStream()),
                     "bn_backward_elemt");
  return grad_input;
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("bn_backward_reduce", &fusedres::bn_backward_reduce_cuda);
  m.impl("bn_backward_elemt", &fusedres::bn_backward_elemt_cuda);
}
