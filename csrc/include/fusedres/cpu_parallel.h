// Work split for the CPU kernels (.cpp only).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedres {

// Elements per parallel task: large enough to amortise a thread hand-off (ATen uses the same).
constexpr int64_t kGrainElements = 32768;

// Rows of `channels` elements per task.
inline int64_t rows_per_task(int64_t channels) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(channels, 1));
}

// kSums per-channel sums over a rows x channels tensor that do not depend on the thread count:
// the rows are cut into slabs of rows_per_task(channels) (boundaries fixed by the shape), each
// slab accumulates into its own kSums x channels doubles in parallel, and the slabs are added in
// slab order. add_row(row, sums) adds one row, sum j of channel c at sums[j * channels + c].
// Returns the kSums x channels totals.
template <int kSums, typename AddRow>
std::vector<double> deterministic_channel_sums(int64_t rows, int64_t channels, AddRow add_row) {
  const int64_t slab_rows = rows_per_task(channels);
  const int64_t slabs = (rows + slab_rows - 1) / slab_rows;
  const int64_t width = kSums * channels;
  std::vector<double> partial(static_cast<size_t>(slabs * width), 0.0);
  at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slab = begin; slab < end; ++slab) {
      double* sums = partial.data() + slab * width;
      const int64_t row_end = std::min(rows, (slab + 1) * slab_rows);
      for (int64_t row = slab * slab_rows; row < row_end; ++row) add_row(row, sums);
    }
  });
  std::vector<double> total(static_cast<size_t>(width), 0.0);
  for (int64_t slab = 0; slab < slabs; ++slab) {
    for (int64_t i = 0; i < width; ++i) total[i] += partial[slab * width + i];
  }
  return total;
}

}  // namespace fusedres
