// Backward of the conv_bn_act epilogue on CUDA, deterministic: no float atomics, and the sums
// are added in an order fixed by the shapes alone, so a rerun gives bit-identical results.
//
// Stage 1 (one pass over the data): grid (ceil(K/32), num_partials). A block owns 32 channels of
// one row-slab; its 32 x 8 threads put threadIdx.x along the channels (a warp reads 32 consecutive
// channels of a row, coalesced in the channels-fastest layout) and threadIdx.y along the rows.
// Each thread writes grad_conv for its elements and keeps an fp32 sum for its channel; the 8
// row-lanes are then added in order through shared memory and the block writes one partial per
// channel to workspace[slab][k].
// Stage 2: one thread per channel adds its num_partials partials in slab order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fusedres/cuda_channel_reduction.cuh"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launch.h"
#include "fusedres/cuda_launchers.h"
#include "fusedres/epilogue.h"

namespace fusedres::cuda {
namespace {

template <typename T, bool kRelu>
__global__ void __launch_bounds__(kChannelsPerBlock * kRowLanes)
    bn_act_backward_partials_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                                    const float* __restrict__ scale, T* __restrict__ grad_conv,
                                    float* __restrict__ workspace, int64_t rows,
                                    int64_t channels, int64_t rows_per_slab) {
  __shared__ float shift_sums[kRowLanes][kChannelsPerBlock];
  static_assert(sizeof(shift_sums) <= kMaxStaticSharedBytes, "static shared memory");

  const int lane_k = threadIdx.x;
  const int lane_row = threadIdx.y;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + lane_k;
  const int64_t slab = blockIdx.y;
  const int64_t row_begin = slab * rows_per_slab;
  const int64_t row_end = row_begin + rows_per_slab < rows ? row_begin + rows_per_slab : rows;

  float sum_g = 0.f;
  if (k < channels) {
    const float s = scale != nullptr ? scale[k] : 1.f;
#pragma unroll 4
    for (int64_t row = row_begin + lane_row; row < row_end; row += kRowLanes) {
      const int64_t offset = row * channels + k;
      const float g = act_grad<kRelu>(to_float(grad_out[offset]), to_float(out[offset]));
      grad_conv[offset] = from_float<T>(g * s);
      sum_g += g;
    }
  }
  shift_sums[lane_row][lane_k] = sum_g;
  __syncthreads();

  if (lane_row != 0 || k >= channels) return;
  float block_g = 0.f;
#pragma unroll
  for (int i = 0; i < kRowLanes; ++i) block_g += shift_sums[i][lane_k];
  workspace[slab * channels + k] = block_g;
}

__global__ void __launch_bounds__(kFinalizeThreads)
    bn_act_backward_finalize_kernel(const float* __restrict__ workspace,
                                    float* __restrict__ grad_shift, int64_t channels,
                                    int64_t num_partials) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (k >= channels) return;
  float total_g = 0.f;
  for (int64_t p = 0; p < num_partials; ++p) total_g += workspace[p * channels + k];
  grad_shift[k] = total_g;
}

template <typename T>
int launch_for_dtype(const BnActBackwardArgs& args, cudaStream_t stream) {
  const int64_t num_partials = bn_act_backward_num_partials(args.rows);
  const int64_t rows_per_slab = (args.rows + num_partials - 1) / num_partials;
  const int64_t channel_blocks = (args.channels + kChannelsPerBlock - 1) / kChannelsPerBlock;
  if (channel_blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(num_partials));

  const dim3 block(kChannelsPerBlock, kRowLanes);
  const auto* grad_out = static_cast<const T*>(args.grad_out);
  const auto* out = static_cast<const T*>(args.out);
  auto* grad_conv = static_cast<T*>(args.grad_conv);
  if (args.relu) {
    FUSEDRES_LAUNCH(grid, block, 0, stream, bn_act_backward_partials_kernel<T, true>)(
        grad_out, out, args.scale, grad_conv, args.workspace, args.rows, args.channels,
        rows_per_slab);
  } else {
    FUSEDRES_LAUNCH(grid, block, 0, stream, bn_act_backward_partials_kernel<T, false>)(
        grad_out, out, args.scale, grad_conv, args.workspace, args.rows, args.channels,
        rows_per_slab);
  }
  if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess) return status;

  const int64_t finalize_blocks = (args.channels + kFinalizeThreads - 1) / kFinalizeThreads;
  FUSEDRES_LAUNCH(static_cast<unsigned>(finalize_blocks), kFinalizeThreads, 0, stream,
                  bn_act_backward_finalize_kernel)(args.workspace, args.grad_shift, args.channels,
                                                   num_partials);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t bn_act_backward_num_partials(int64_t rows) {
  return channel_reduction_partials(rows);
}

int launch_bn_act_backward(const BnActBackwardArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.channels < 0) return cudaErrorInvalidValue;
  if (args.channels == 0) return cudaSuccess;
  // With rows == 0 the kernels still run, read no element (empty tensors may have null data) and
  // write zero sums.
  const bool has_data =
      args.grad_out != nullptr && args.out != nullptr && args.grad_conv != nullptr;
  if ((args.rows > 0 && !has_data) || args.grad_shift == nullptr || args.workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return launch_for_dtype<decltype(tag)>(args, stream);
  });
}

}  // namespace fusedres::cuda
