// bn_act_backward on CUDA: validation shared with the CPU kernel, then the two-stage
// deterministic reduction of bn_act_backward_cuda.cu.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_act_backward/bn_act_backward.h"
#include "fusedres/cuda_glue.h"

namespace fusedres {
namespace {

std::tuple<at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const std::optional<at::Tensor>& scale,
    bool relu) {
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  auto ops = prepare_bn_act_backward(grad_out, out, scale);
  auto grad_conv = at::empty_like(ops.grad_out, at::MemoryFormat::ChannelsLast);
  const auto fp32 = ops.grad_out.options().dtype(at::kFloat).memory_format(std::nullopt);
  auto grad_shift = at::empty({ops.channels}, fp32);
  if (ops.rows == 0 || ops.channels == 0) {
    grad_shift.zero_();
    return {grad_conv, grad_shift};
  }
  const int64_t partials = cuda::bn_act_backward_num_partials(ops.rows);
  auto workspace = at::empty({partials * ops.channels}, fp32);

  cuda::BnActBackwardArgs args{};
  args.rows = ops.rows;
  args.channels = ops.channels;
  args.dtype = cuda::dtype_of(ops.grad_out);
  args.grad_out = ops.grad_out.const_data_ptr();
  args.out = ops.out.const_data_ptr();
  args.scale = ops.scale.defined() ? ops.scale.const_data_ptr<float>() : nullptr;
  args.grad_conv = grad_conv.mutable_data_ptr();
  args.grad_shift = grad_shift.mutable_data_ptr<float>();
  args.workspace = workspace.mutable_data_ptr<float>();
  args.relu = relu;
  cuda::check_launch(cuda::launch_bn_act_backward(args, c10::cuda::getCurrentCUDAStream()),
                     "bn_act_backward");
  return {grad_conv, grad_shift};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("bn_act_backward", &fusedres::bn_act_backward_cuda);
}
