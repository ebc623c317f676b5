// conv_bn_backward on the CPU, the twin of the CUDA kernels' math in parallel passes: the
// BN-backward prologue of the gradient and the BN+ReLU recompute of the input, each rounded to the
// storage dtype as the GPU rounds them on load and widened to fp32; ATen's convolution_backward
// (oneDNN) in fp32; then one pass that applies the previous ReLU's mask to the dgrad, rounds it
// and reduces that BN's two backward sums of the stored values (double, fixed slab order).
#include "conv_bn_backward/conv_bn_backward.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "fusedres/aten_checks.h"
#include "fusedres/batchnorm.h"
#include "fusedres/cpu_parallel.h"
#include "fusedres/epilogue.h"

namespace fusedres {

ConvBnBackwardOperands prepare_conv_bn_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_y,
    const std::optional<at::Tensor>& grad_coef, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& shift_in,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& invstd_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 2> output_mask) {
  constexpr const char* op = "conv_bn_backward";
  ConvBnBackwardOperands ops;
  static_cast<ConvOperands&>(ops) = prepare_conv(op, x, weight, stride, padding, dilation, groups);
  const ConvGeometry& g = ops.geom;
  const auto cl = at::MemoryFormat::ChannelsLast;

  TORCH_CHECK(grad.sizes() == at::IntArrayRef({g.N, g.K, g.P, g.Q}), op,
              ": grad must have the conv output's shape (", g.N, ", ", g.K, ", ", g.P, ", ", g.Q,
              "), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  check_same_device(op, "grad", grad, "x", x);
  ops.grad = grad.contiguous(cl);

  TORCH_CHECK(grad_y.has_value() == grad_coef.has_value(), op,
              ": grad_y and grad_coef must be given together");
  if (grad_y.has_value()) {
    check_like(op, "grad_y", *grad_y, "grad", grad);
    ops.grad_y = grad_y->contiguous(cl);
    const at::Tensor& coef = *grad_coef;
    TORCH_CHECK(coef.dim() == 2 && coef.size(0) == 4 && coef.size(1) == g.K, op,
                ": grad_coef must have shape (4, ", g.K,
                ") (rows mean, grad_scale, mean_g, xhat_coef), got ",
                coef.sizes());
    TORCH_CHECK(at::isFloatingType(coef.scalar_type()), op,
                ": grad_coef must be floating point, got ", coef.scalar_type());
    check_same_device(op, "grad_coef", coef, "x", x);
    ops.grad_coef = coef.to(at::kFloat).contiguous();
  }

  ops.scale_in = per_channel_fp32(op, "scale_in", scale_in, g.C, "x", x);
  ops.shift_in = per_channel_fp32(op, "shift_in", shift_in, g.C, "x", x);
  ops.mean_in = per_channel_fp32(op, "mean_in", mean_in, g.C, "x", x);
  ops.invstd_in = per_channel_fp32(op, "invstd_in", invstd_in, g.C, "x", x);
  const bool all = ops.scale_in.defined() && ops.shift_in.defined() && ops.mean_in.defined() &&
                   ops.invstd_in.defined();
  const bool none = !ops.scale_in.defined() && !ops.shift_in.defined() &&
                    !ops.mean_in.defined() && !ops.invstd_in.defined();
  TORCH_CHECK(all || none, op, ": scale_in, shift_in, mean_in and invstd_in must be given together");
  ops.need_input = output_mask[0];
  ops.need_weight = output_mask[1];
  return ops;
}

ConvBnBackwardOutputs empty_conv_bn_backward_outputs(const ConvBnBackwardOperands& ops) {
  const ConvGeometry& g = ops.geom;
  const auto act = ops.x.options().memory_format(std::nullopt);
  const auto fp32 = act.dtype(at::kFloat);
  ConvBnBackwardOutputs out;
  out.grad_input = ops.need_input
                       ? at::empty({g.N, g.C, g.H, g.W},
                                   act.memory_format(at::MemoryFormat::ChannelsLast))
                       : at::empty({0}, act);
  out.grad_weight = ops.need_weight
                        ? at::empty({g.K, g.c_per_group(), g.R, g.S},
                                    act.memory_format(at::MemoryFormat::Contiguous))
                        : at::empty({0}, act);
  const int64_t sums = ops.with_sums() ? g.C : 0;
  out.sum_g = at::empty({sums}, fp32);
  out.sum_g_xhat = at::empty({sums}, fp32);
  return out;
}


namespace {

// dy = bn_backward_elem(grad, y) per element (rows x K, channel fastest), with the per-channel
// constants read from grad_coef's rows; rounded to the storage type as the GPU rounds it before
// its MMAs, widened to fp32 for oneDNN.
template <typename scalar_t>
void bn_grad_prologue_cpu(const scalar_t* grad, const scalar_t* y, const float* coef, int64_t rows,
                          int64_t K, float* out) {
  std::vector<BnBackwardChannel> channels(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    channels[k] = {coef[k], coef[K + k], coef[2 * K + k], coef[3 * K + k]};
  }
  at::parallel_for(0, rows, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = row * K + k;
        out[i] = static_cast<float>(static_cast<scalar_t>(bn_backward_elem(
            static_cast<float>(grad[i]), static_cast<float>(y[i]), channels[k])));
      }
    }
  });
}

// g = dgrad * (x*scale + shift > 0), rounded into grad_input; per channel sum(g) and
// sum(g * (x - mean) * invstd) of the stored g, independent of the thread count.
template <typename scalar_t>
void masked_dgrad_with_sums_cpu(const float* dgrad, const scalar_t* x, int64_t rows, int64_t C,
                                const float* scale, const float* shift, const float* mean,
                                const float* invstd, scalar_t* grad_input, float* sum_g,
                                float* sum_g_xhat) {
  const std::vector<double> sums =
      deterministic_channel_sums<2>(rows, C, [&](int64_t row, double* slab) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = row * C + c;
          const float xv = static_cast<float>(x[i]);
          const float g = relu_masked_grad<ReluMask::kFromPrologue>(dgrad[i], xv, 0.f, scale[c],
                                                                    shift[c]);
          const scalar_t stored = static_cast<scalar_t>(g);
          grad_input[i] = stored;
          const double gs = static_cast<double>(stored);
          slab[c] += gs;
          slab[C + c] += gs * static_cast<double>((xv - mean[c]) * invstd[c]);
        }
      });
  for (int64_t c = 0; c < C; ++c) {
    sum_g[c] = static_cast<float>(sums[c]);
    sum_g_xhat[c] = static_cast<float>(sums[C + c]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_y,
    const std::optional<at::Tensor>& grad_coef, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& shift_in,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& invstd_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 2> output_mask) {
  auto ops = prepare_conv_bn_backward(grad, grad_y, grad_coef, x, weight, scale_in, shift_in,
                                      mean_in, invstd_in, stride, padding, dilation, groups,
                                      output_mask);
  auto out = empty_conv_bn_backward_outputs(ops);
  if (!ops.need_input && !ops.need_weight) return {out.grad_input, out.grad_weight, out.sum_g, out.sum_g_xhat};
  const ConvGeometry& g = ops.geom;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto dtype = ops.x.scalar_type();

  at::Tensor dy;
  if (ops.grad_coef.defined()) {
    dy = at::empty(ops.grad.sizes(), ops.grad.options().dtype(at::kFloat).memory_format(cl));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "conv_bn_backward_prologue", [&] {
      bn_grad_prologue_cpu(ops.grad.const_data_ptr<scalar_t>(), ops.grad_y.const_data_ptr<scalar_t>(),
                           ops.grad_coef.const_data_ptr<float>(), g.gemm_m(), g.K,
                           dy.mutable_data_ptr<float>());
    });
  } else {
    dy = ops.grad.to(at::kFloat);
  }
  // The input's values only matter to the weight gradient; dgrad reads its shape alone.
  at::Tensor input;
  if (!ops.need_weight) {
    input = at::empty(ops.x.sizes(), ops.x.options().dtype(at::kFloat).memory_format(cl));
  } else if (ops.scale_in.defined()) {
    input = bn_relu_input_fp32_cpu(ops.x, ops.scale_in, ops.shift_in);
  } else {
    input = ops.x.to(at::kFloat);
  }
  at::Tensor weight_fp32 = ops.weight.to(at::kFloat);
  // torch 2.14's CPU (oneDNN) weight gradient of a strided 1x1 conv corrupts the heap when the
  // input or the weight has channels-last strides: that case runs on dense NCHW copies (a 1x1
  // weight passes is_contiguous() with either strides, so clone, not contiguous()).
  if (ops.need_weight && g.R == 1 && g.S == 1 && (g.stride_h > 1 || g.stride_w > 1)) {
    input = input.clone(at::MemoryFormat::Contiguous);
    weight_fp32 = weight_fp32.clone(at::MemoryFormat::Contiguous);
  }
  auto [dgrad, wgrad, unused_bias] = at::convolution_backward(
      dy, input, weight_fp32, std::nullopt, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w},
      {g.dil_h, g.dil_w}, /*transposed=*/false, /*output_padding=*/{0, 0}, g.groups,
      {ops.need_input, ops.need_weight, false});

  if (ops.need_input) {
    dgrad = dgrad.contiguous(cl);
    if (ops.with_sums()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "conv_bn_backward_dgrad", [&] {
        masked_dgrad_with_sums_cpu(
            dgrad.const_data_ptr<float>(), ops.x.const_data_ptr<scalar_t>(), g.N * g.H * g.W, g.C,
            ops.scale_in.const_data_ptr<float>(), ops.shift_in.const_data_ptr<float>(),
            ops.mean_in.const_data_ptr<float>(), ops.invstd_in.const_data_ptr<float>(),
            out.grad_input.mutable_data_ptr<scalar_t>(), out.sum_g.mutable_data_ptr<float>(),
            out.sum_g_xhat.mutable_data_ptr<float>());
      });
    } else {
      out.grad_input.copy_(dgrad);
    }
  }
  if (ops.need_weight) out.grad_weight.copy_(wgrad);
  return {out.grad_input, out.grad_weight, out.sum_g, out.sum_g_xhat};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("conv_bn_backward", &fusedres::conv_bn_backward_cpu);
}
