// Vectorised access for the CUDA kernels (.cu only): kVec consecutive elements moved as one
// aligned load or store, and the launch shape of the channels-last elementwise kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fusedres::cuda {

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Packed {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Packed<T, kVec> load_packed(const T* p) {
  return *reinterpret_cast<const Packed<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_packed(T* p, const Packed<T, kVec>& v) {
  *reinterpret_cast<Packed<T, kVec>*>(p) = v;
}

inline bool is_aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Elementwise kernels over rows x channels (channels fastest): each thread owns kVec consecutive
// channels of one row at a time, in a grid-stride loop. The grid is capped: a few waves of
// resident blocks saturate memory bandwidth, and the cap keeps gridDim.x in range for any size.
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = 8192;

inline unsigned elementwise_blocks(int64_t work_items) {
  const int64_t blocks = (work_items + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(blocks < kMaxElementwiseBlocks ? (blocks > 0 ? blocks : 1)
                                                              : kMaxElementwiseBlocks);
}

// 16-byte vectors when every row starts 16-byte aligned (channels % vector width == 0) and so do
// the base pointers; callers fall back to one element per access otherwise.
template <typename T>
constexpr int kWideVec = 16 / static_cast<int>(sizeof(T));

}  // namespace fusedres::cuda
