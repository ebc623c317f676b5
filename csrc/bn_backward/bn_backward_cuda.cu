// Train-mode BatchNorm(+ReLU) backward on CUDA (batchnorm.h has the math).
//
// bn_backward_reduce, deterministic (no float atomics; sums in an order fixed by the shapes):
// - Stage 1: grid (ceil(K/32), num_partials). A block owns 32 channels of one row slab; its
//   32 x 8 threads put threadIdx.x along the channels (a warp reads 32 consecutive channels of a
//   row, coalesced in the channels-last layout) and threadIdx.y along the rows. Each thread sums
//   g and g * (y - mean) for its channel; the 8 row lanes are added in order through shared
//   memory and the block writes one partial per channel to workspace[0 or 1][slab][k].
// - Stage 2: one thread per channel adds its partials in slab order (in double, free at this
//   size) and applies invstd once.
// bn_backward_elemt: each thread owns kVec consecutive channels of one row at a time (16-byte
// accesses when channels and pointers allow), with the per-channel constants of batchnorm.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fusedres/batchnorm.h"
#include "fusedres/cuda_channel_reduction.cuh"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launch.h"
#include "fusedres/cuda_launchers.h"
#include "fusedres/cuda_vector.cuh"

namespace fusedres::cuda {
namespace {

// g for one element of channel c; `act_out` is the element's saved output when kMask reads it
// (the caller loads it only then), and act_scale/act_shift are read only when kMask needs them.
template <ReluMask kMask>
__device__ __forceinline__ float masked_grad(const ReluMaskOperands& mask, float grad, float y,
                                             float act_out, int64_t c) {
  const bool recompute = kMask == ReluMask::kFromPrologue;
  return relu_masked_grad<kMask>(grad, y, act_out, recompute ? mask.act_scale[c] : 0.f,
                                 recompute ? mask.act_shift[c] : 0.f);
}

template <typename T, ReluMask kMask>
__global__ void __launch_bounds__(kChannelsPerBlock * kRowLanes)
    bn_backward_partials_kernel(const BnBackwardReduceArgs args, int64_t rows_per_slab,
                                int64_t num_partials) {
  __shared__ float g_sums[kRowLanes][kChannelsPerBlock];
  __shared__ float g_centered_sums[kRowLanes][kChannelsPerBlock];
  static_assert(sizeof(g_sums) + sizeof(g_centered_sums) <= kMaxStaticSharedBytes,
                "static shared memory");

  const int lane_k = threadIdx.x;
  const int lane_row = threadIdx.y;
  const int64_t channels = args.channels;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + lane_k;
  const int64_t slab = blockIdx.y;
  const int64_t row_begin = slab * rows_per_slab;
  const int64_t row_end = row_begin + rows_per_slab < args.rows ? row_begin + rows_per_slab
                                                                : args.rows;
  const T* grad = static_cast<const T*>(args.grad);
  const T* y = static_cast<const T*>(args.y);
  const T* act_out = static_cast<const T*>(args.mask.act_out);

  float sum_g = 0.f;
  float sum_g_centered = 0.f;
  if (k < channels) {
    const float mean = args.mean[k];
#pragma unroll 4
    for (int64_t row = row_begin + lane_row; row < row_end; row += kRowLanes) {
      const int64_t offset = row * channels + k;
      const float yv = to_float(y[offset]);
      const float out = kMask == ReluMask::kFromOutput ? to_float(act_out[offset]) : 0.f;
      const float g = masked_grad<kMask>(args.mask, to_float(grad[offset]), yv, out, k);
      sum_g += g;
      sum_g_centered += g * (yv - mean);
    }
  }
  g_sums[lane_row][lane_k] = sum_g;
  g_centered_sums[lane_row][lane_k] = sum_g_centered;
  __syncthreads();

  if (lane_row != 0 || k >= channels) return;
  float block_g = 0.f;
  float block_g_centered = 0.f;
#pragma unroll
  for (int i = 0; i < kRowLanes; ++i) {
    block_g += g_sums[i][lane_k];
    block_g_centered += g_centered_sums[i][lane_k];
  }
  args.workspace[slab * channels + k] = block_g;
  args.workspace[(num_partials + slab) * channels + k] = block_g_centered;
}

__global__ void __launch_bounds__(kFinalizeThreads)
    bn_backward_sums_kernel(const BnBackwardReduceArgs args, int64_t num_partials) {
  const int64_t channels = args.channels;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (k >= channels) return;
  const float* g_partials = args.workspace;
  const float* g_centered_partials = args.workspace + num_partials * channels;
  double total_g = 0.0;
  double total_g_centered = 0.0;
  for (int64_t p = 0; p < num_partials; ++p) {
    total_g += g_partials[p * channels + k];
    total_g_centered += g_centered_partials[p * channels + k];
  }
  args.sum_g[k] = static_cast<float>(total_g);
  args.sum_g_xhat[k] = static_cast<float>(total_g_centered * args.invstd[k]);
}

template <typename T, int kVec, ReluMask kMask>
__global__ void __launch_bounds__(kElementwiseThreads)
    bn_backward_elemt_kernel(const BnBackwardElemtArgs args) {
  const int64_t K = args.channels;
  const int64_t vecs_per_row = K / kVec;
  const int64_t num_vecs = args.rows * vecs_per_row;
  const float inv_count = 1.f / static_cast<float>(args.count);
  const T* grad = static_cast<const T*>(args.grad);
  const T* y = static_cast<const T*>(args.y);
  const T* act_out = static_cast<const T*>(args.mask.act_out);
  T* grad_input = static_cast<T*>(args.grad_input);

  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x;
       v < num_vecs; v += static_cast<int64_t>(gridDim.x) * kElementwiseThreads) {
    const int64_t row = v / vecs_per_row;
    const int64_t k0 = (v - row * vecs_per_row) * kVec;
    const int64_t offset = row * K + k0;
    const Packed<T, kVec> grads = load_packed<T, kVec>(grad + offset);
    const Packed<T, kVec> ys = load_packed<T, kVec>(y + offset);
    Packed<T, kVec> outs{};
    if constexpr (kMask == ReluMask::kFromOutput) outs = load_packed<T, kVec>(act_out + offset);
    Packed<T, kVec> result;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int64_t c = k0 + i;
      const float yv = to_float(ys.v[i]);
      const float g =
          masked_grad<kMask>(args.mask, to_float(grads.v[i]), yv, to_float(outs.v[i]), c);
      const BnBackwardChannel coef = bn_backward_channel(
          args.mean[c], args.invstd[c], args.weight != nullptr ? args.weight[c] : 1.f,
          args.sum_g[c], args.sum_g_xhat[c], inv_count);
      result.v[i] = from_float<T>(bn_backward_elem(g, yv, coef));
    }
    store_packed(grad_input + offset, result);
  }
}

ReluMask mask_of(const ReluMaskOperands& mask) {
  if (mask.act_out != nullptr) return ReluMask::kFromOutput;
  return mask.act_scale != nullptr ? ReluMask::kFromPrologue : ReluMask::kNone;
}

template <typename T, ReluMask kMask>
int launch_reduce(const BnBackwardReduceArgs& args, cudaStream_t stream) {
  const int64_t num_partials = bn_backward_num_partials(args.rows);
  const int64_t rows_per_slab = (args.rows + num_partials - 1) / num_partials;
  const int64_t channel_blocks = (args.channels + kChannelsPerBlock - 1) / kChannelsPerBlock;
  if (channel_blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(num_partials));
  FUSEDRES_LAUNCH(grid, dim3(kChannelsPerBlock, kRowLanes), 0, stream,
                  bn_backward_partials_kernel<T, kMask>)(args, rows_per_slab, num_partials);
  if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess) return status;

  const int64_t sum_blocks = (args.channels + kFinalizeThreads - 1) / kFinalizeThreads;
  FUSEDRES_LAUNCH(static_cast<unsigned>(sum_blocks), kFinalizeThreads, 0, stream,
                  bn_backward_sums_kernel)(args, num_partials);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_reduce_for_dtype(const BnBackwardReduceArgs& args, cudaStream_t stream) {
  switch (mask_of(args.mask)) {
    case ReluMask::kNone:
      return launch_reduce<T, ReluMask::kNone>(args, stream);
    case ReluMask::kFromOutput:
      return launch_reduce<T, ReluMask::kFromOutput>(args, stream);
    case ReluMask::kFromPrologue:
      return launch_reduce<T, ReluMask::kFromPrologue>(args, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int kVec>
int launch_elemt(const BnBackwardElemtArgs& args, cudaStream_t stream) {
  const unsigned blocks = elementwise_blocks(args.rows * (args.channels / kVec));
  switch (mask_of(args.mask)) {
    case ReluMask::kNone:
      FUSEDRES_LAUNCH(blocks, kElementwiseThreads, 0, stream,
                      bn_backward_elemt_kernel<T, kVec, ReluMask::kNone>)(args);
      break;
    case ReluMask::kFromOutput:
      FUSEDRES_LAUNCH(blocks, kElementwiseThreads, 0, stream,
                      bn_backward_elemt_kernel<T, kVec, ReluMask::kFromOutput>)(args);
      break;
    case ReluMask::kFromPrologue:
      FUSEDRES_LAUNCH(blocks, kElementwiseThreads, 0, stream,
                      bn_backward_elemt_kernel<T, kVec, ReluMask::kFromPrologue>)(args);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_elemt_for_dtype(const BnBackwardElemtArgs& args, cudaStream_t stream) {
  constexpr int kWide = kWideVec<T>;
  const bool wide = args.channels % kWide == 0 && is_aligned(args.grad, 16) &&
                    is_aligned(args.y, 16) && is_aligned(args.grad_input, 16) &&
                    is_aligned(args.mask.act_out, 16);
  return wide ? launch_elemt<T, kWide>(args, stream) : launch_elemt<T, 1>(args, stream);
}

bool mask_is_valid(const ReluMaskOperands& mask) {
  return (mask.act_scale == nullptr) == (mask.act_shift == nullptr);
}

}  // namespace

int64_t bn_backward_num_partials(int64_t rows) {
  return channel_reduction_partials(rows);
}

int launch_bn_backward_reduce(const BnBackwardReduceArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.channels < 0) return cudaErrorInvalidValue;
  if (args.channels == 0) return cudaSuccess;
  // With rows == 0 the kernels still run, read no element (empty tensors may have null data) and
  // write zero sums.
  const bool has_data = args.grad != nullptr && args.y != nullptr;
  if ((args.rows > 0 && !has_data) || args.mean == nullptr || args.invstd == nullptr ||
      args.sum_g == nullptr || args.sum_g_xhat == nullptr || args.workspace == nullptr ||
      !mask_is_valid(args.mask)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return launch_reduce_for_dtype<decltype(tag)>(args, stream);
  });
}

int launch_bn_backward_elemt(const BnBackwardElemtArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.channels < 0 || args.count <= 0) return cudaErrorInvalidValue;
  if (args.rows == 0 || args.channels == 0) return cudaSuccess;
  if (args.grad == nullptr || args.y == nullptr || args.grad_input == nullptr ||
      args.mean == nullptr || args.invstd == nullptr || args.sum_g == nullptr ||
      args.sum_g_xhat == nullptr || !mask_is_valid(args.mask)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return launch_elemt_for_dtype<decltype(tag)>(args, stream);
  });
}

}  // namespace fusedres::cuda
