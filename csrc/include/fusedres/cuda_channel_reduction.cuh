// Shape of the deterministic per-channel reductions of the backward kernels (.cu only): stage 1
// splits the rows into slabs, each block of kChannelsPerBlock x kRowLanes threads writes one
// partial per channel of its slab; stage 2 adds the partials in slab order (no float atomics).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fusedres::cuda {

constexpr int kChannelsPerBlock = 32;
constexpr int kRowLanes = 8;
constexpr int kFinalizeThreads = 256;
// Slabs of at least 64 rows keep each thread's serial loop worth launching; 512 slabs of
// 32-channel blocks fill any current GPU many times over, and bound the workspace to
// 2 * 512 * K floats.
constexpr int64_t kMinRowsPerSlab = 64;
constexpr int64_t kMaxPartials = 512;

inline int64_t channel_reduction_partials(int64_t rows) {
  const int64_t slabs = (rows + kMinRowsPerSlab - 1) / kMinRowsPerSlab;
  return std::max<int64_t>(1, std::min(kMaxPartials, slabs));
}

}  // namespace fusedres::cuda
