// bn_add_act on the CPU: one parallel pass over the rows of the channels-last output; each row
// locates its shortcut row once (identity, projection or option A alike).
#include "bn_add_act/bn_add_act.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "fusedres/aten_checks.h"
#include "fusedres/batchnorm.h"
#include "fusedres/cpu_parallel.h"
#include "fusedres/epilogue.h"

namespace fusedres {

BnAddActOperands prepare_bn_add_act(const at::Tensor& y, const at::Tensor& scale,
                                    const at::Tensor& shift,
                                    const std::optional<at::Tensor>& shortcut,
                                    const std::optional<at::Tensor>& shortcut_scale,
                                    const std::optional<at::Tensor>& shortcut_shift,
                                    int64_t shortcut_stride) {
  constexpr const char* op = "bn_add_act";
  TORCH_CHECK(y.dim() == 4, op, ": y must be 4-D (N, K, P, Q), got ", y.dim(), "-D");
  check_activation_dtype(op, "y", y);
  const int64_t N = y.size(0), K = y.size(1), P = y.size(2), Q = y.size(3);
  const auto cl = at::MemoryFormat::ChannelsLast;

  BnAddActOperands ops{};
  ops.y = y.contiguous(cl);
  ops.scale = per_channel_fp32(op, "scale", scale, K, "y", y);
  ops.shift = per_channel_fp32(op, "shift", shift, K, "y", y);
  ops.rows = N * P * Q;
  ops.channels = K;
  ops.shortcut_geom = ShortcutGeometry{P, Q, P, Q, K, 1};
  if (!shortcut.has_value()) {
    TORCH_CHECK(!shortcut_scale.has_value() && !shortcut_shift.has_value(), op,
                ": shortcut_scale and shortcut_shift need a shortcut");
    return ops;
  }
  const at::Tensor& sc = *shortcut;
  TORCH_CHECK(sc.dim() == 4, op, ": shortcut must be 4-D (N, C, H, W), got ", sc.dim(), "-D");
  TORCH_CHECK(sc.scalar_type() == y.scalar_type(), op, ": shortcut dtype ", sc.scalar_type(),
              " does not match y dtype ", y.scalar_type());
  check_same_device(op, "shortcut", sc, "y", y);
  TORCH_CHECK(shortcut_stride > 0, op, ": shortcut_stride must be positive, got ",
              shortcut_stride);
  const int64_t s = shortcut_stride;
  TORCH_CHECK(sc.size(0) == N && sc.size(1) <= K && (sc.size(2) + s - 1) / s == P &&
                  (sc.size(3) + s - 1) / s == Q,
              op, ": shortcut of shape ", sc.sizes(), " subsampled by shortcut_stride=", s,
              " must give (", N, ", C <= ", K, ", ", P, ", ", Q, ") to match y");
  ops.shortcut = sc.contiguous(cl);
  ops.shortcut_geom = ShortcutGeometry{P, Q, sc.size(2), sc.size(3), sc.size(1), s};
  ops.shortcut_scale = per_channel_fp32(op, "shortcut_scale", shortcut_scale, sc.size(1),
                                        "shortcut", sc);
  ops.shortcut_shift = per_channel_fp32(op, "shortcut_shift", shortcut_shift, sc.size(1),
                                        "shortcut", sc);
  return ops;
}

namespace {

template <typename scalar_t, bool kRelu, bool kShortcut>
void bn_add_act_kernel(const BnAddActOperands& ops, scalar_t* out) {
  const int64_t K = ops.channels;
  const scalar_t* y = ops.y.const_data_ptr<scalar_t>();
  const float* scale = ops.scale.const_data_ptr<float>();
  const float* shift = ops.shift.const_data_ptr<float>();
  const scalar_t* shortcut = optional_data<scalar_t>(ops.shortcut);
  const float* sc_scale = optional_data<float>(ops.shortcut_scale);
  const float* sc_shift = optional_data<float>(ops.shortcut_shift);
  const ShortcutGeometry& sg = ops.shortcut_geom;
  at::parallel_for(0, ops.rows, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* src = y + row * K;
      scalar_t* dst = out + row * K;
      int64_t k = 0;
      if constexpr (kShortcut) {
        const scalar_t* sc = shortcut + shortcut_row_offset(sg, row);
        for (; k < sg.C; ++k) {
          const float term = shortcut_value(static_cast<float>(sc[k]), sc_scale ? sc_scale[k] : 1.f,
                                            sc_shift ? sc_shift[k] : 0.f);
          dst[k] = static_cast<scalar_t>(
              bn_act<kRelu>(static_cast<float>(src[k]), scale[k], shift[k], term));
        }
      }
      // Channels past the shortcut's are zero-extended (option A), or all of them without one.
      for (; k < K; ++k) {
        dst[k] = static_cast<scalar_t>(
            bn_act<kRelu>(static_cast<float>(src[k]), scale[k], shift[k], 0.f));
      }
    }
  });
}

at::Tensor bn_add_act_cpu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                          const std::optional<at::Tensor>& shortcut,
                          const std::optional<at::Tensor>& shortcut_scale,
                          const std::optional<at::Tensor>& shortcut_shift,
                          int64_t shortcut_stride, bool relu) {
  auto ops = prepare_bn_add_act(y, scale, shift, shortcut, shortcut_scale, shortcut_shift,
                                shortcut_stride);
  at::Tensor out = at::empty_like(ops.y, at::MemoryFormat::ChannelsLast);
  const bool with_shortcut = ops.shortcut.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ops.y.scalar_type(), "bn_add_act_cpu",
                                  [&] {
    auto run = relu ? (with_shortcut ? bn_add_act_kernel<scalar_t, true, true>
                                     : bn_add_act_kernel<scalar_t, true, false>)
                    : (with_shortcut ? bn_add_act_kernel<scalar_t, false, true>
                                     : bn_add_act_kernel<scalar_t, false, false>);
    run(ops, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) { m.impl("bn_add_act", &fusedres::bn_add_act_cpu); }
