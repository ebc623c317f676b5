// bn_act_backward on the CPU: one parallel pass over row slabs writes grad_conv and per-slab
// channel sums; the slabs are then added in a fixed order, so results do not depend on the
// thread count schedule (deterministic).
#include "bn_act_backward/bn_act_backward.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "fusedres/cpu_parallel.h"
#include "fusedres/epilogue.h"

namespace fusedres {

BnActBackwardOperands prepare_bn_act_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                              const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(grad_out.dim() == 4, "bn_act_backward: grad_out must be 4-D, got ",
              grad_out.dim(), "-D");
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "bn_act_backward: out has shape ", out.sizes(),
              " but grad_out has ", grad_out.sizes());
  const auto dtype = grad_out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "bn_act_backward: grad_out must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(out.scalar_type() == dtype && out.device() == grad_out.device(),
              "bn_act_backward: out must match grad_out in dtype and device");
  const int64_t K = grad_out.size(1);
  if (scale.has_value()) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == K, "bn_act_backward: scale must have shape (",
                K, ",), got ", scale->sizes());
    TORCH_CHECK(scale->device() == grad_out.device(), "bn_act_backward: scale is on ",
                scale->device(), " but grad_out is on ", grad_out.device());
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  return BnActBackwardOperands{
      grad_out.contiguous(cl),
      out.contiguous(cl),
      scale.has_value() ? scale->to(at::kFloat).contiguous() : at::Tensor(),
      grad_out.size(0) * grad_out.size(2) * grad_out.size(3),
      K};
}

namespace {

template <typename scalar_t, bool kRelu>
void bn_act_backward_kernel(const BnActBackwardOperands& ops, scalar_t* grad_conv,
                            float* grad_shift) {
  const int64_t rows = ops.rows;
  const int64_t K = ops.channels;
  const scalar_t* dy = ops.grad_out.const_data_ptr<scalar_t>();
  const scalar_t* y = ops.out.const_data_ptr<scalar_t>();
  const float* scale = ops.scale.defined() ? ops.scale.const_data_ptr<float>() : nullptr;

  const std::vector<double> sum_g =
      deterministic_channel_sums<1>(rows, K, [&](int64_t row, double* sums) {
        const int64_t base = row * K;
        for (int64_t k = 0; k < K; ++k) {
          const float g = act_grad<kRelu>(static_cast<float>(dy[base + k]),
                                          static_cast<float>(y[base + k]));
          grad_conv[base + k] = static_cast<scalar_t>(scale ? g * scale[k] : g);
          sums[k] += g;
        }
      });
  for (int64_t k = 0; k < K; ++k) grad_shift[k] = static_cast<float>(sum_g[k]);
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const std::optional<at::Tensor>& scale,
    bool relu) {
  auto ops = prepare_bn_act_backward(grad_out, out, scale);
  auto grad_conv = at::empty_like(ops.grad_out, at::MemoryFormat::ChannelsLast);
  const auto fp32 = ops.grad_out.options().dtype(at::kFloat).memory_format(std::nullopt);
  auto grad_shift = at::empty({ops.channels}, fp32);  // every channel is written
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.grad_out.scalar_type(),
                                  "bn_act_backward_cpu", [&] {
    auto run = relu ? bn_act_backward_kernel<scalar_t, true> : bn_act_backward_kernel<scalar_t, false>;
    run(ops, grad_conv.mutable_data_ptr<scalar_t>(), grad_shift.mutable_data_ptr<float>());
  });
  return {grad_conv, grad_shift};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("bn_act_backward", &fusedres::bn_act_backward_cpu);
}
