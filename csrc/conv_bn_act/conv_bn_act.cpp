// conv_bn_act on the CPU: ATen's convolution (oneDNN) for the main loop, then one fused,
// parallel pass for scale, shift, residual and ReLU, in place on the conv output. Each row
// locates its residual row once (the output's shape or option A alike).
#include "conv_bn_act/conv_bn_act.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <torch/library.h>

#include "fusedres/aten_checks.h"
#include "fusedres/cpu_parallel.h"
#include "fusedres/epilogue.h"

namespace fusedres {

namespace {

// `t` channels-last with exactly the canonical strides. contiguous(ChannelsLast) keeps a tensor
// whose size-1 dims carry other strides, and oneDNN miscomputes grouped convs on such weights
// (e.g. (6, 2, 3, 1) with strides (6, 1, 2, 1)).
at::Tensor dense_channels_last(const at::Tensor& t) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor out = t.contiguous(cl);
  if (out.strides() == at::IntArrayRef(c10::get_channels_last_strides_2d(out.sizes()))) return out;
  return at::empty(out.sizes(), out.options().memory_format(cl)).copy_(out);
}

}  // namespace

ConvOperands prepare_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (K, C/groups, R, S), got ",
              weight.dim(), "-D");
  check_activation_dtype(op, "x", x);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " does not match x dtype ", x.scalar_type());
  check_same_device(op, "weight", weight, "x", x);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 elements each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);

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
  TORCH_CHECK(g.C % groups == 0 && g.K % groups == 0, op, ": groups=", groups,
              " must divide the input channels (", g.C, ") and output channels (", g.K, ")");
  TORCH_CHECK(g.C > 0, op, ": x has no input channels (C=0); a convolution needs at least one");
  TORCH_CHECK(g.K > 0, op, ": weight has no filters (K=0); a convolution needs at least one");
  TORCH_CHECK(weight.size(1) * groups == g.C, op, ": weight has ", weight.size(1),
              " input channels per group but x has ", g.C, " channels and groups=", groups);
  g.P = conv_out_size(g.H, g.R, g.stride_h, g.pad_h, g.dil_h);
  g.Q = conv_out_size(g.W, g.S, g.stride_w, g.pad_w, g.dil_w);
  TORCH_CHECK(g.P > 0 && g.Q > 0, op, ": input ", g.H, "x", g.W, " is too small for a ", g.R,
              "x", g.S, " filter with this padding and dilation");

  return ConvOperands{dense_channels_last(x), dense_channels_last(weight), g};
}

ConvBnActOperands prepare_conv_bn_act(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift,
                                      const std::optional<at::Tensor>& residual,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups,
                                      int64_t residual_stride) {
  constexpr const char* op = "conv_bn_act";
  ConvBnActOperands ops{prepare_conv(op, x, weight, stride, padding, dilation, groups)};
  const ConvGeometry& g = ops.geom;
  ops.scale = per_channel_fp32(op, "scale", scale, g.K, "x", x);
  ops.shift = per_channel_fp32(op, "shift", shift, g.K, "x", x);
  TORCH_CHECK(residual_stride > 0, op, ": residual_stride must be positive, got ",
              residual_stride);
  ops.residual_geom = ShortcutGeometry{g.P, g.Q, g.P, g.Q, g.K, 1};
  if (residual.has_value()) {
    const at::Tensor& res = *residual;
    const int64_t s = residual_stride;
    TORCH_CHECK(res.dim() == 4 && res.size(0) == g.N && res.size(1) <= g.K &&
                    (res.size(2) + s - 1) / s == g.P && (res.size(3) + s - 1) / s == g.Q,
                op, ": residual must have the output's shape (", g.N, ", ", g.K, ", ", g.P, ", ",
                g.Q, ") once subsampled by residual_stride=", s, " (with at most ", g.K,
                " channels), got ", res.sizes());
    TORCH_CHECK(res.scalar_type() == x.scalar_type(), op, ": residual dtype ", res.scalar_type(),
                " does not match x dtype ", x.scalar_type());
    check_same_device(op, "residual", res, "x", x);
    ops.residual = res.contiguous(at::MemoryFormat::ChannelsLast);
    ops.residual_geom = ShortcutGeometry{g.P, g.Q, res.size(2), res.size(3), res.size(1), s};
  }
  return ops;
}

at::Tensor empty_conv_output(const ConvOperands& ops) {
  const auto& g = ops.geom;
  return at::empty({g.N, g.K, g.P, g.Q},
                   ops.x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor convolution_fp32_cpu(const ConvOperands& ops, const at::Tensor& input_fp32) {
  const ConvGeometry& g = ops.geom;
  const at::Tensor weight =
      ops.weight.scalar_type() == at::kFloat ? ops.weight : ops.weight.to(at::kFloat);
  return at::convolution(input_fp32, weight, std::nullopt, {g.stride_h, g.stride_w},
                         {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w}, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, g.groups)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

namespace {

// out = act(acc * scale + shift + residual) over rows x K (channel fastest); `out` may be `acc`.
// The residual (if any) is read as `rg` describes: 0 for the channels past rg.C.
template <typename scalar_t, bool kRelu>
void epilogue_cpu(const float* acc, int64_t rows, int64_t K, const float* scale,
                  const float* shift, const scalar_t* residual, const ShortcutGeometry& rg,
                  scalar_t* out) {
  at::parallel_for(0, rows, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* src = acc + row * K;
      scalar_t* dst = out + row * K;
      int64_t k = 0;
      if (residual != nullptr) {
        const scalar_t* res = residual + shortcut_row_offset(rg, row);
        for (; k < rg.C; ++k) {
          dst[k] = static_cast<scalar_t>(bn_act<kRelu>(src[k], scale ? scale[k] : 1.f,
                                                       shift ? shift[k] : 0.f,
                                                       static_cast<float>(res[k])));
        }
      }
      for (; k < K; ++k) {
        dst[k] = static_cast<scalar_t>(
            bn_act<kRelu>(src[k], scale ? scale[k] : 1.f, shift ? shift[k] : 0.f, 0.f));
      }
    }
  });
}

at::Tensor conv_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool relu, int64_t residual_stride) {
  auto ops = prepare_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation,
                                 groups, residual_stride);
  const bool fp32 = ops.x.scalar_type() == at::kFloat;
  at::Tensor acc = convolution_fp32_cpu(ops, fp32 ? ops.x : ops.x.to(at::kFloat));
  // fp32 writes back into the conv output; reduced precision needs its own buffer.
  at::Tensor out = fp32 ? acc : empty_conv_output(ops);

  const float* scale_ptr = ops.scale.defined() ? ops.scale.const_data_ptr<float>() : nullptr;
  const float* shift_ptr = ops.shift.defined() ? ops.shift.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cpu",
                                  [&] {
    auto run = relu ? epilogue_cpu<scalar_t, true> : epilogue_cpu<scalar_t, false>;
    run(acc.const_data_ptr<float>(), ops.geom.gemm_m(), ops.geom.K, scale_ptr, shift_ptr,
        optional_data<scalar_t>(ops.residual), ops.residual_geom, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) { m.impl("conv_bn_act", &fusedres::conv_bn_act_cpu); }
