// conv_bn_stats on CUDA: y = conv(prologue(x), W) with the per-channel batch statistics of y in
// the epilogue, then a small kernel that merges them. Deterministic: no float atomics, and every
// sum runs in an order fixed by the shapes alone.
//
// Kernel 1, the implicit-GEMM conv of implicit_gemm.cuh:
// - Prologue: relu(x * scale_in + shift_in), the previous layer's BN+ReLU, on in-bounds input
//   elements as they are staged (padding stays 0); or none.
// - Epilogue: thread (lane, col) of 2 x 64 owns channel col of the 128 x 64 accumulator tile and
//   every other row. Pass 1 rounds each value to the storage type, stores it to y, writes the
//   stored value back into the tile and sums; the two lanes' sums give the tile mean. Pass 2 sums
//   the squared deviations from that mean (two-pass statistics of the values BN will
//   normalise: no cancellation when |mean| >> std). Lane 0 writes the tile's (mean, m2) for its channel to the workspace at
//   [row tile][k]; the row count of a tile follows from its index.
// Kernel 2: block of 32 channels x 16 lanes; lane j merges tiles j, j + 16, ... with Chan's
// formula, then lane 0 merges the 16 lane results in lane order and writes mean and m2. It merges
// in double, which costs nothing visible in a kernel this small and keeps thousands of merges per
// channel from accumulating fp32 rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "conv_bn_act/implicit_gemm.cuh"
#include "fusedres/batchnorm.h"
#include "fusedres/conv_geometry.h"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launch.h"
#include "fusedres/cuda_launchers.h"

namespace fusedres::cuda {
namespace {

using namespace implicit_gemm;

constexpr int kStatsRowLanes = kThreads / kBlockN;
static_assert(kThreads % kBlockN == 0, "whole rows per pass");
constexpr int kMergeChannels = 32;
constexpr int kMergeLanes = 16;

__device__ int64_t rows_in_tile(int64_t gemm_m, int64_t tile) {
  const int64_t rest = gemm_m - tile * kBlockM;
  return rest < kBlockM ? rest : kBlockM;
}

template <typename T>
struct StoreWithStatsEpilogue {
  T* y;                 // M x K
  float* partial_mean;  // [row tile][K]
  float* partial_m2;    // [row tile][K]
  static constexpr int kSharedBytes = kStatsRowLanes * kBlockN * static_cast<int>(sizeof(float));

  __device__ void operator()(const ConvGeometry& g, const OutputTile& tile) const {
    __shared__ float lane_sums[kStatsRowLanes][kBlockN];
    static_assert(sizeof(lane_sums) == kSharedBytes, "kSharedBytes counts lane_sums");
    const int col = static_cast<int>(threadIdx.x) % kBlockN;
    const int lane = static_cast<int>(threadIdx.x) / kBlockN;
    const int64_t k_in_group = tile.n0 + col;
    const bool channel_valid = k_in_group < g.k_per_group();
    const int64_t k = tile.grp * g.k_per_group() + k_in_group;
    const int64_t row_tile = tile.m0 / kBlockM;
    const int rows = static_cast<int>(rows_in_tile(g.gemm_m(), row_tile));

    float sum = 0.f;
    if (channel_valid) {
      for (int row = lane; row < rows; row += kStatsRowLanes) {
        float& acc = tile.acc[row * kAccPitch + col];
        const T stored = from_float<T>(acc);
        y[(tile.m0 + row) * g.K + k] = stored;
        acc = to_float(stored);
        sum += acc;
      }
    }
    lane_sums[lane][col] = sum;
    __syncthreads();
    float tile_sum = 0.f;
#pragma unroll
    for (int i = 0; i < kStatsRowLanes; ++i) tile_sum += lane_sums[i][col];
    const float mean = tile_sum / static_cast<float>(rows);
    __syncthreads();  // every lane has read lane_sums before it is reused for m2

    float m2 = 0.f;
    if (channel_valid) {
      for (int row = lane; row < rows; row += kStatsRowLanes) {
        const float d = tile.acc[row * kAccPitch + col] - mean;
        m2 += d * d;
      }
    }
    lane_sums[lane][col] = m2;
    __syncthreads();
    if (lane != 0 || !channel_valid) return;
    float tile_m2 = 0.f;
#pragma unroll
    for (int i = 0; i < kStatsRowLanes; ++i) tile_m2 += lane_sums[i][col];
    partial_mean[row_tile * g.K + k] = mean;
    partial_m2[row_tile * g.K + k] = tile_m2;
  }
};

__global__ void __launch_bounds__(kMergeChannels * kMergeLanes)
    merge_tile_stats_kernel(const float* __restrict__ partial_mean,
                            const float* __restrict__ partial_m2, float* __restrict__ mean,
                            float* __restrict__ m2, int64_t channels, int64_t gemm_m,
                            int64_t num_tiles) {
  __shared__ MeanM2<double> lane_stats[kMergeLanes][kMergeChannels];
  static_assert(sizeof(lane_stats) <= kMaxStaticSharedBytes, "static shared memory");
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kMergeChannels + threadIdx.x;
  const int lane = threadIdx.y;

  MeanM2<double> stats{0, 0.0, 0.0};
  if (k < channels) {
    for (int64_t t = lane; t < num_tiles; t += kMergeLanes) {
      const int64_t offset = t * channels + k;
      stats = chan_merge<double>(
          stats, {rows_in_tile(gemm_m, t), partial_mean[offset], partial_m2[offset]});
    }
  }
  lane_stats[lane][threadIdx.x] = stats;
  __syncthreads();
  if (lane != 0 || k >= channels) return;
#pragma unroll
  for (int i = 1; i < kMergeLanes; ++i) stats = chan_merge(stats, lane_stats[i][threadIdx.x]);
  mean[k] = static_cast<float>(stats.mean);
  m2[k] = static_cast<float>(stats.m2);
}

template <typename T>
int launch_for_dtype(const ConvBnStatsArgs& args, cudaStream_t stream) {
  const ConvGeometry& g = args.geom;
  const int64_t num_tiles = num_row_tiles(g);
  float* partial_mean = args.workspace;
  float* partial_m2 = args.workspace + num_tiles * g.K;
  const StoreWithStatsEpilogue<T> epilogue{static_cast<T*>(args.y), partial_mean, partial_m2};
  const int status =
      args.scale_in != nullptr
          ? launch<T>(g, args.x, args.weight, args.allow_tf32,
                      BnReluPrologue{args.scale_in, args.shift_in}, epilogue, stream)
          : launch<T>(g, args.x, args.weight, args.allow_tf32, IdentityPrologue{}, epilogue,
                      stream);
  if (status != cudaSuccess) return status;

  const int64_t merge_blocks = (g.K + kMergeChannels - 1) / kMergeChannels;
  if (merge_blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  FUSEDRES_LAUNCH(static_cast<unsigned>(merge_blocks), dim3(kMergeChannels, kMergeLanes), 0,
                  stream, merge_tile_stats_kernel)(partial_mean, partial_m2, args.mean, args.m2,
                                                   g.K, g.gemm_m(), num_tiles);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t conv_bn_stats_num_partials(const ConvGeometry& geom) { return num_row_tiles(geom); }

int launch_conv_bn_stats(const ConvBnStatsArgs& args, cudaStream_t stream) {
  const ConvGeometry& g = args.geom;
  if (g.groups <= 0 || g.C % g.groups != 0 || g.K % g.groups != 0) return cudaErrorInvalidValue;
  if (g.K == 0) return cudaSuccess;
  // Statistics of an empty batch are undefined; the glue rejects it before launching.
  if (g.gemm_m() <= 0) return cudaErrorInvalidValue;
  // With no reduction (C == 0) x and weight are empty and never read.
  const bool has_operands = args.x != nullptr && args.weight != nullptr;
  if (args.y == nullptr || args.mean == nullptr || args.m2 == nullptr ||
      args.workspace == nullptr || (g.gemm_k() > 0 && !has_operands) ||
      (args.scale_in == nullptr) != (args.shift_in == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return launch_for_dtype<decltype(tag)>(args, stream);
  });
}

}  // namespace fusedres::cuda
