// conv_bn_stats on the CPU, in three parallel passes: the prologue relu(x*scale_in + shift_in)
// materialised in fp32, ATen's convolution (oneDNN) in fp32, then one pass that rounds y to the
// storage dtype, stores it and reduces the per-channel statistics of the stored values.
#include "conv_bn_stats/conv_bn_stats.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fusedres/aten_checks.h"
#include "fusedres/batchnorm.h"
#include "fusedres/cpu_parallel.h"
#include "fusedres/epilogue.h"

namespace fusedres {

ConvBnStatsOperands prepare_conv_bn_stats(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& scale_in,
                                          const std::optional<at::Tensor>& shift_in,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv_bn_stats";
  ConvBnStatsOperands ops{prepare_conv(op, x, weight, stride, padding, dilation, groups)};
  const ConvGeometry& g = ops.geom;
  TORCH_CHECK(g.gemm_m() > 0, op, ": batch statistics need at least one output pixel, got an "
              "output of shape (", g.N, ", ", g.K, ", ", g.P, ", ", g.Q, ")");
  ops.scale_in = per_channel_fp32(op, "scale_in", scale_in, g.C, "x", x);
  ops.shift_in = per_channel_fp32(op, "shift_in", shift_in, g.C, "x", x);
  check_both_or_neither(op, "scale_in", ops.scale_in, "shift_in", ops.shift_in);
  return ops;
}

at::Tensor empty_channel_stats(const ConvOperands& ops) {
  return at::empty({ops.geom.K}, ops.x.options().dtype(at::kFloat).memory_format(std::nullopt));
}

namespace {

// relu(x * scale + shift) over rows x C (channel fastest), rounded to the storage type as the
// reference rounds the activation it convolves, and widened to fp32 for the main loop.
template <typename scalar_t>
void bn_relu_prologue_cpu(const scalar_t* x, int64_t rows, int64_t C, const float* scale,
                          const float* shift, float* out) {
  at::parallel_for(0, rows, rows_per_task(C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* src = x + row * C;
      float* dst = out + row * C;
      for (int64_t c = 0; c < C; ++c) {
        dst[c] = static_cast<float>(
            static_cast<scalar_t>(bn_relu(static_cast<float>(src[c]), scale[c], shift[c])));
      }
    }
  });
}

// Rounds the fp32 conv output (rows x K) to the storage type into y (which may be acc itself)
// and computes the per-channel mean and m2 of the stored values, in double as ATen's CPU
// BatchNorm does. Each slab of rows gets an exact two-pass (mean, m2), the second pass reading the
// slab while it is still in cache; the slabs are then merged with Chan's formula in slab order.
// Slab boundaries depend on the shape alone, so the statistics do not depend on the thread count
// (deterministic).
template <typename scalar_t>
void store_with_stats_cpu(const float* acc, int64_t rows, int64_t K, scalar_t* y, float* mean,
                          float* m2) {
  const int64_t slab_rows = rows_per_task(K);
  const int64_t slabs = (rows + slab_rows - 1) / slab_rows;
  std::vector<double> slab_mean(static_cast<size_t>(slabs * K), 0.0);
  std::vector<double> slab_m2(static_cast<size_t>(slabs * K), 0.0);
  at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slab = begin; slab < end; ++slab) {
      const int64_t row_begin = slab * slab_rows;
      const int64_t row_end = std::min(rows, row_begin + slab_rows);
      double* sum = slab_mean.data() + slab * K;
      double* dev2 = slab_m2.data() + slab * K;
      for (int64_t row = row_begin; row < row_end; ++row) {
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t stored = static_cast<scalar_t>(acc[row * K + k]);
          y[row * K + k] = stored;
          sum[k] += static_cast<double>(stored);
        }
      }
      const double inv_count = 1.0 / static_cast<double>(row_end - row_begin);
      for (int64_t k = 0; k < K; ++k) sum[k] *= inv_count;  // now the slab mean
      for (int64_t row = row_begin; row < row_end; ++row) {
        for (int64_t k = 0; k < K; ++k) {
          const double d = static_cast<double>(y[row * K + k]) - sum[k];
          dev2[k] += d * d;
        }
      }
    }
  });

  std::vector<MeanM2<double>> total(static_cast<size_t>(K), MeanM2<double>{0, 0.0, 0.0});
  for (int64_t slab = 0; slab < slabs; ++slab) {
    const int64_t count = std::min(rows, (slab + 1) * slab_rows) - slab * slab_rows;
    for (int64_t k = 0; k < K; ++k) {
      total[k] = chan_merge<double>(total[k],
                                    {count, slab_mean[slab * K + k], slab_m2[slab * K + k]});
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    mean[k] = static_cast<float>(total[k].mean);
    m2[k] = static_cast<float>(total[k].m2);
  }
}

}  // namespace

at::Tensor bn_relu_input_fp32_cpu(const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& shift) {
  at::Tensor input = at::empty(
      x.sizes(), x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_input_cpu",
                                  [&] {
    bn_relu_prologue_cpu(x.const_data_ptr<scalar_t>(), x.size(0) * x.size(2) * x.size(3),
                         x.size(1), scale.const_data_ptr<float>(), shift.const_data_ptr<float>(),
                         input.mutable_data_ptr<float>());
  });
  return input;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale_in,
    const std::optional<at::Tensor>& shift_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  auto ops = prepare_conv_bn_stats(x, weight, scale_in, shift_in, stride, padding, dilation,
                                   groups);
  const ConvGeometry& g = ops.geom;
  const bool fp32 = ops.x.scalar_type() == at::kFloat;
  const at::Tensor input = ops.scale_in.defined()
                               ? bn_relu_input_fp32_cpu(ops.x, ops.scale_in, ops.shift_in)
                               : (fp32 ? ops.x : ops.x.to(at::kFloat));
  at::Tensor acc = convolution_fp32_cpu(ops, input);
  // fp32 is stored in place in the conv output; reduced precision needs its own buffer.
  at::Tensor y = fp32 ? acc : empty_conv_output(ops);
  at::Tensor mean = empty_channel_stats(ops);
  at::Tensor m2 = empty_channel_stats(ops);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_stats_cpu",
                                  [&] {
    store_with_stats_cpu(acc.const_data_ptr<float>(), g.gemm_m(), g.K,
                         y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(),
                         m2.mutable_data_ptr<float>());
  });
  return {y, mean, m2};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) { m.impl("conv_bn_stats", &fusedres::conv_bn_stats_cpu); }
