// bn_add_act on CUDA: validation shared with the CPU kernel, then the elementwise kernel of
// bn_add_act_cuda.cu.
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_add_act/bn_add_act.h"
#include "fusedres/aten_checks.h"
#include "fusedres/cuda_glue.h"

namespace fusedres {
namespace {

at::Tensor bn_add_act_cuda(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& shortcut,
                           const std::optional<at::Tensor>& shortcut_scale,
                           const std::optional<at::Tensor>& shortcut_shift,
                           int64_t shortcut_stride, bool relu) {
  const c10::cuda::CUDAGuard device_guard(y.device());
  auto ops = prepare_bn_add_act(y, scale, shift, shortcut, shortcut_scale, shortcut_shift,
                                shortcut_stride);
  at::Tensor out = at::empty_like(ops.y, at::MemoryFormat::ChannelsLast);
  if (out.numel() == 0) return out;

  cuda::BnAddActArgs args{};
  args.rows = ops.rows;
  args.channels = ops.channels;
  args.dtype = cuda::dtype_of(ops.y);
  args.y = ops.y.const_data_ptr();
  args.scale = ops.scale.const_data_ptr<float>();
  args.shift = ops.shift.const_data_ptr<float>();
  args.shortcut = optional_data(ops.shortcut);
  args.shortcut_geom = ops.shortcut_geom;
  args.shortcut_scale = optional_data<float>(ops.shortcut_scale);
  args.shortcut_shift = optional_data<float>(ops.shortcut_shift);
  args.out = out.mutable_data_ptr();
  args.relu = relu;
  cuda::check_launch(cuda::launch_bn_add_act(args, c10::cuda::getCurrentCUDAStream()),
                     "bn_add_act");
  return out;
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) { m.impl("bn_add_act", &fusedres::bn_add_act_cuda); }
