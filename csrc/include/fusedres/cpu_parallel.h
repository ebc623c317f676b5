// Work split for the CPU kernels (.cpp only).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fusedres {

// Elements per parallel task: large enough to amortise a thread hand-off (ATen uses the same).
constexpr int64_t kGrainElements = 32768;

// Rows of `channels` elements per task.
inline int64_t rows_per_task(int64_t channels) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(channels, 1));
}

}  // namespace fusedres
