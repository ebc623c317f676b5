// conv_bn_act on CUDA: validates with the CPU kernel's helper, then launches the implicit-GEMM
// kernel of conv_bn_act_cuda.cu on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "conv_bn_act/conv_bn_act.h"
#include "fusedres/cuda_glue.h"

namespace fusedres {
namespace {

at::Tensor conv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            bool relu, int64_t residual_stride) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto ops = prepare_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation,
                                 groups, residual_stride);
  at::Tensor out = empty_conv_output(ops);
  if (out.numel() == 0) return out;

  cuda::ConvBnActArgs args{};
  args.geom = ops.geom;
  args.dtype = cuda::dtype_of(ops.x);
  args.x = ops.x.const_data_ptr();
  args.weight = ops.weight.const_data_ptr();
  args.scale = ops.scale.defined() ? ops.scale.const_data_ptr<float>() : nullptr;
  args.shift = ops.shift.defined() ? ops.shift.const_data_ptr<float>() : nullptr;
  args.residual = ops.residual.defined() ? ops.residual.const_data_ptr() : nullptr;
  args.residual_geom = ops.residual_geom;
  args.out = out.mutable_data_ptr();
  args.relu = relu;
  args.allow_tf32 = cuda::conv_allows_tf32();
  cuda::check_launch(cuda::launch_conv_bn_act(args, c10::cuda::getCurrentCUDAStream()),
                     "conv_bn_act");
  return out;
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) { m.impl("conv_bn_act", &fusedres::conv_bn_act_cuda); }
