// Kernels with seeded bugs (and their correct twins) that the emulator must catch, written as CUDA
// source is (__global__, __shared__, FUSEDRES_LAUNCH): test_emulated_selftest.py runs them.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "fusedres/cuda_launch.h"

namespace fusedres_emu_selftest {

namespace wmma = nvcuda::wmma;
constexpr int kThreads = 64;

// Each thread publishes its index and reads its right neighbour's; without the barrier the read
// races the write.
template <bool kBarrier>
__global__ void neighbour_kernel(float* out) {
  __shared__ float values[kThreads];
  const int t = threadIdx.x;
  values[t] = static_cast<float>(t);
  if (kBarrier) __syncthreads();
  out[t] = values[(t + 1) % kThreads];
}

// A thread leaves before a barrier the others wait at.
__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Two halves of the block wait at different barriers.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// C = A * B for 16 x 16 x 16 fp16 tiles staged in shared memory at `offset` elements past an
// aligned start with row pitch `ldm`; one warp. `skip_lane` (>= 0) skips the B load.
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, int offset, int ldm,
                            int skip_lane) {
  __shared__ __align__(32) __half tile[2][16 * 24 + 16];
  __shared__ __align__(32) float acc[16 * 16];
  for (int i = threadIdx.x; i < 16 * 16; i += 32) {
    tile[0][offset + i / 16 * ldm + i % 16] = a[i];
    tile[1][offset + i / 16 * ldm + i % 16] = b[i];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, tile[0] + offset, ldm);
  if (static_cast<int>(threadIdx.x) != skip_lane) wmma::load_matrix_sync(fb, tile[1] + offset, ldm);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(acc, fc, 16, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 16; i += 32) c[i] = acc[i];
}

// C = A * B for 16 x 16 x 8 tf32 tiles read straight from global memory (aligned by the caller),
// with the operands rounded by __float_to_tf32 or, if not, truncated by the tensor cores.
__global__ void tf32_kernel(const float* a, const float* b, float* c, float* rounded, int n,
                            bool round) {
  __shared__ __align__(32) float sa[16 * 8];
  __shared__ __align__(32) float sb[8 * 16];
  for (int i = threadIdx.x; i < 16 * 8; i += 32) {
    sa[i] = round ? wmma::__float_to_tf32(a[i]) : a[i];
    sb[i] = round ? wmma::__float_to_tf32(b[i]) : b[i];
  }
  for (int i = threadIdx.x; i < n; i += 32) rounded[i] = wmma::__float_to_tf32(a[i]);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, sa, 8);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

// Warp sum by butterfly shuffles; `exit_lane` (>= 0) leaves first, so the others deadlock.
__global__ void shuffle_kernel(const float* in, float* out, int exit_lane) {
  if (static_cast<int>(threadIdx.x) == exit_lane) return;
  float v = in[threadIdx.x];
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  const float down = __shfl_down_sync(0xffffffffu, in[threadIdx.x], 1);
  __syncwarp();
  out[threadIdx.x] = v;
  out[32 + threadIdx.x] = down;
}

// Missing bound checks: a thread per element of a 64-thread block over n < 64 elements, in global
// and in shared memory (the sanitizer build's redzones catch both).
__global__ void unchecked_store_kernel(float* out, int n) {
  out[threadIdx.x] = static_cast<float>(n);
}

__global__ void unchecked_shared_kernel(float* out, int n) {
  __shared__ float staged[48];
  staged[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < n) out[threadIdx.x] = staged[threadIdx.x];
}

}  // namespace fusedres_emu_selftest

using namespace fusedres_emu_selftest;

extern "C" {

int emu_selftest_neighbour(int barrier, float* out) {
  if (barrier) {
    FUSEDRES_LAUNCH(1, kThreads, 0, nullptr, neighbour_kernel<true>)(out);
  } else {
    FUSEDRES_LAUNCH(1, kThreads, 0, nullptr, neighbour_kernel<false>)(out);
  }
  return cudaGetLastError();
}

int emu_selftest_early_exit(float* out) {
  FUSEDRES_LAUNCH(1, 32, 0, nullptr, early_exit_kernel)(out);
  return cudaGetLastError();
}

int emu_selftest_divergent_barrier(float* out) {
  FUSEDRES_LAUNCH(1, 32, 0, nullptr, divergent_barrier_kernel)(out);
  return cudaGetLastError();
}

int emu_selftest_wmma(const void* a, const void* b, float* c, int offset, int ldm, int skip_lane) {
  FUSEDRES_LAUNCH(1, 32, 0, nullptr, wmma_kernel)(static_cast<const __half*>(a),
                                                  static_cast<const __half*>(b), c, offset, ldm,
                                                  skip_lane);
  return cudaGetLastError();
}

int emu_selftest_tf32(const float* a, const float* b, float* c, float* rounded, int n, int round) {
  FUSEDRES_LAUNCH(1, 32, 0, nullptr, tf32_kernel)(a, b, c, rounded, n, round != 0);
  return cudaGetLastError();
}

int emu_selftest_shuffle(const float* in, float* out, int exit_lane) {
  FUSEDRES_LAUNCH(1, 32, 0, nullptr, shuffle_kernel)(in, out, exit_lane);
  return cudaGetLastError();
}

int emu_selftest_unchecked(int shared, float* out, int n) {
  if (shared) {
    FUSEDRES_LAUNCH(1, kThreads, 0, nullptr, unchecked_shared_kernel)(out, n);
  } else {
    FUSEDRES_LAUNCH(1, kThreads, 0, nullptr, unchecked_store_kernel)(out, n);
  }
  return cudaGetLastError();
}

}  // extern "C"
