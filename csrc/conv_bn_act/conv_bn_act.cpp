// conv_bn_act on the CPU: ATen's convolution (oneDNN) for the main loop, then one fused,
// parallel pass for scale, shift, residual and ReLU, in place on the conv output.
#include "conv_bn_act/conv_bn_act.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fusedres/cpu_parallel.h"
#include "fusedres/epilogue.h"

namespace fusedres {
namespace {

void check_per_channel(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                       int64_t K) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == K, "conv_bn_act: ", name,
              " must have shape (", K, ",) (one value per output channel), got ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), "conv_bn_act: ", name, " is on ", t->device(),
              " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "conv_bn_act: ", name,
              " must be floating point, got ", t->scalar_type());
}

at::Tensor as_fp32_vector(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  return t->to(at::kFloat).contiguous();
}

}  // namespace

ConvBnActOperands prepare_conv_bn_act(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift,
                                      const std::optional<at::Tensor>& residual,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "conv_bn_act: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, "conv_bn_act: weight must be 4-D (K, C/groups, R, S), got ",
              weight.dim(), "-D");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "conv_bn_act: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, "conv_bn_act: weight dtype ", weight.scalar_type(),
              " does not match x dtype ", dtype);
  TORCH_CHECK(weight.device() == x.device(), "conv_bn_act: weight is on ", weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv_bn_act: stride, padding and dilation must have 2 elements each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "conv_bn_act: stride must be positive, got ",
              stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "conv_bn_act: dilation must be positive, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "conv_bn_act: padding must be >= 0, got ",
              padding);
  TORCH_CHECK(groups > 0, "conv_bn_act: groups must be positive, got ", groups);

  ConvGeometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = weight.size(0);
  g.R = weight.size(2);
  g.S = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  g.groups = groups;
  TORCH_CHECK(g.C % groups == 0 && g.K % groups == 0, "conv_bn_act: groups=", groups,
              " must divide the input channels (", g.C, ") and output channels (", g.K, ")");
  TORCH_CHECK(weight.size(1) * groups == g.C, "conv_bn_act: weight has ", weight.size(1),
              " input channels per group but x has ", g.C, " channels and groups=", groups);
  g.P = conv_out_size(g.H, g.R, g.stride_h, g.pad_h, g.dil_h);
  g.Q = conv_out_size(g.W, g.S, g.stride_w, g.pad_w, g.dil_w);
  TORCH_CHECK(g.P > 0 && g.Q > 0, "conv_bn_act: input ", g.H, "x", g.W,
              " is too small for a ", g.R, "x", g.S, " filter with this padding and dilation");

  check_per_channel(scale, "scale", x, g.K);
  check_per_channel(shift, "shift", x, g.K);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({g.N, g.K, g.P, g.Q}),
                "conv_bn_act: residual must have the output's shape (", g.N, ", ", g.K, ", ",
                g.P, ", ", g.Q, "), got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == dtype, "conv_bn_act: residual dtype ",
                residual->scalar_type(), " does not match x dtype ", dtype);
    TORCH_CHECK(residual->device() == x.device(), "conv_bn_act: residual is on ",
                residual->device(), " but x is on ", x.device());
  }

  const auto cl = at::MemoryFormat::ChannelsLast;
  return ConvBnActOperands{x.contiguous(cl),
                           weight.contiguous(cl),
                           as_fp32_vector(scale),
                           as_fp32_vector(shift),
                           residual.has_value() ? residual->contiguous(cl) : at::Tensor(),
                           g};
}

at::Tensor empty_conv_output(const ConvBnActOperands& ops) {
  const auto& g = ops.geom;
  return at::empty({g.N, g.K, g.P, g.Q},
                   ops.x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

namespace {

// out = act(acc * scale + shift + residual) over rows x K (channel fastest); `out` may be `acc`.
template <typename scalar_t, bool kRelu>
void epilogue_cpu(const float* acc, int64_t rows, int64_t K, const float* scale,
                  const float* shift, const scalar_t* residual, scalar_t* out) {
  at::parallel_for(0, rows, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* src = acc + row * K;
      const scalar_t* res = residual ? residual + row * K : nullptr;
      scalar_t* dst = out + row * K;
      for (int64_t k = 0; k < K; ++k) {
        dst[k] = static_cast<scalar_t>(bn_act<kRelu>(src[k], scale ? scale[k] : 1.f,
                                                     shift ? shift[k] : 0.f,
                                                     res ? static_cast<float>(res[k]) : 0.f));
      }
    }
  });
}

at::Tensor conv_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool relu) {
  auto ops = prepare_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation,
                                 groups);
  // The main loop runs in fp32 whatever the storage dtype, so reduced precision is rounded once,
  // at the end, as on the GPU.
  const bool fp32 = ops.x.scalar_type() == at::kFloat;
  at::Tensor acc = at::convolution(fp32 ? ops.x : ops.x.to(at::kFloat),
                                   fp32 ? ops.weight : ops.weight.to(at::kFloat), std::nullopt,
                                   stride, padding, dilation, /*transposed=*/false,
                                   /*output_padding=*/{0, 0}, groups)
                       .contiguous(at::MemoryFormat::ChannelsLast);
  // fp32 writes back into the conv output; reduced precision needs its own buffer.
  at::Tensor out = fp32 ? acc : empty_conv_output(ops);

  const float* scale_ptr = ops.scale.defined() ? ops.scale.const_data_ptr<float>() : nullptr;
  const float* shift_ptr = ops.shift.defined() ? ops.shift.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cpu",
                                  [&] {
    const scalar_t* res =
        ops.residual.defined() ? ops.residual.const_data_ptr<scalar_t>() : nullptr;
    auto run = relu ? epilogue_cpu<scalar_t, true> : epilogue_cpu<scalar_t, false>;
    run(acc.const_data_ptr<float>(), ops.geom.gemm_m(), ops.geom.K, scale_ptr, shift_ptr, res,
        out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) { m.impl("conv_bn_act", &fusedres::conv_bn_act_cpu); }
