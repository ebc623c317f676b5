// conv -> BatchNorm (folded to a per-channel affine) -> (+ residual) -> ReLU on CUDA, one launch.
//
// Design: an implicit GEMM, out[M x Kper] = im2col(x)[M x Kd] * W^T[Kd x Kper] per group, with
//   M = N*P*Q output pixels, Kper = K/groups output channels, Kd = R*S*Cg (C fastest, as KRSC).
// - Grid (ceil(M/128), ceil(Kper/64), groups): a block owns a 128 x 64 output tile of one group,
//   so it never straddles groups and reads one contiguous Cg-wide slice of every input pixel.
// - 128 threads (4 warps). Per BK = 32 slice of Kd, every thread gathers its share of the A tile
//   (128 x 32 im2col rows, zero for padding taps and for rows/columns past the problem) and of
//   the B tile (64 x 32 weight rows) into registers, then into shared memory stored [row][Kd]:
//   A row-major, B as the column-major Kd x 64 operand.
// - A thread's Kd column is fixed within a slice, so tap_of_col (the only division) runs once per
//   slice, and the (n, p, q) of the block's 128 pixels are decoded once into shared memory.
// - Wide path, when Cg % (16 B / element size) == 0 and x, weight are 16 B aligned (every
//   ResNet conv but the 3-channel stem): a thread moves 16 B (one tap, consecutive channels) per
//   load, 6 (fp16/bf16) or 12 (fp32) loads per slice, and gathers slice i+1 into registers
//   before the math on slice i, so the global loads overlap the MMAs. Otherwise one element per
//   load (48 per slice), loaded just before staging: prefetching those too would spill.
// - Math, per dtype: fp16/bf16 -> WMMA m16n16k16 with fp32 accumulators; fp32 with allow_tf32 ->
//   WMMA m16n16k8 tf32 (operands rounded to tf32 once, when staged to shared memory); fp32
//   without -> SIMT fmaf (exact fp32, as cuDNN with TF32 off). Tensor-core warps own a 64 x 32
//   sub-tile (4 x 2 fragments); SIMT threads own 8 x 8 outputs strided by 16 rows / 8 columns,
//   which keeps their shared-memory reads free of bank conflicts.
// - Epilogue: accumulators go to a 128 x 64 fp32 tile in shared memory (aliasing the operand
//   tiles); each thread then owns one output channel (scale/shift loaded once) and walks the rows,
//   so a warp writes 32 consecutive channels of a pixel: act(acc*scale + shift + residual),
//   rounded once to the output dtype.
// - Shared memory per block: operand tiles 15,360 B (fp16/bf16) or 27,648 B (fp32), aliased by
//   the 34,816 B accumulator tile, plus 3,072 B of decoded pixels: 37,888 B, under the 48 KB of
//   static shared memory, so no opt-in attribute is needed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "fusedres/conv_geometry.h"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launchers.h"
#include "fusedres/epilogue.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "conv_bn_act_cuda.cu needs sm_80 or newer (bf16 and tf32 WMMA); set TORCH_CUDA_ARCH_LIST"
#endif

namespace fusedres::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBlockM = 128;
constexpr int kBlockN = 64;
constexpr int kBlockK = 32;
constexpr int kThreads = 128;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 2;
static_assert(kWarpsM * kWarpsN * 32 == kThreads, "one warp per warp tile");

// Row pitch of the operand tiles: 16 bytes of padding staggers rows across banks and keeps every
// 16-row fragment start 32-byte aligned, as wmma::load_matrix_sync requires.
template <typename T>
constexpr int kOperandPitch = kBlockK + 16 / static_cast<int>(sizeof(T));
constexpr int kAccPitch = kBlockN + 4;

template <typename T>
constexpr int kOperandBytes = (kBlockM + kBlockN) * kOperandPitch<T> * sizeof(T);
constexpr int kAccBytes = kBlockM * kAccPitch * sizeof(float);
template <typename T>
constexpr int kTileBytes = kOperandBytes<T> > kAccBytes ? kOperandBytes<T> : kAccBytes;

enum class MathMode { kTensorCore16, kTensorCoreTf32, kSimtFp32 };

// kVec consecutive elements moved as one aligned load/store.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Packed {
  T v[kVec];
};

// Gathers one kBlockK-wide slice of a block's two GEMM operands from global memory into
// registers (gather), then writes it to the shared-memory tiles (stage). Splitting the two lets
// the loads of the next slice be in flight while the current one is multiplied.
// With kRoundToTf32 (fp32 on tensor cores) each element is rounded to tf32 as it is staged, once,
// instead of in every warp fragment that later reads it.
template <typename T, int kVec, bool kRoundToTf32>
class OperandStager {
 public:
  static constexpr int kVecsPerRow = kBlockK / kVec;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
  static constexpr int kPassesA = kBlockM / kRowsPerPass;
  static constexpr int kPassesB = kBlockN / kRowsPerPass;
  static_assert(kBlockK % kVec == 0 && kThreads % kVecsPerRow == 0, "tile shape");
  static_assert(kBlockN % kRowsPerPass == 0, "tile shape");

  __device__ OperandStager(const ConvBnActArgs& args, const PixelIndex* pixels, int64_t m0,
                           int64_t n0, int64_t grp)
      : args_(args),
        pixels_(pixels),
        m0_(m0),
        n0_(n0),
        grp_(grp),
        col_(static_cast<int>(threadIdx.x) % kVecsPerRow * kVec),
        row_(static_cast<int>(threadIdx.x) / kVecsPerRow) {}

  // Requires Cg % kVec == 0 when kVec > 1: the kVec columns then share one (r, s) tap, are
  // contiguous in x and in the weight, and are all inside or all outside Kd.
  __device__ void gather(int64_t k0) {
    const ConvGeometry& g = args_.geom;
    const int64_t kd = k0 + col_;
    const bool kd_valid = kd < g.gemm_k();
    TapIndex tap{0, 0, 0};
    if (kd_valid) tap = tap_of_col(g, kd);

    const T* x = static_cast<const T*>(args_.x);
    const int64_t gemm_m = g.gemm_m();
#pragma unroll
    for (int pass = 0; pass < kPassesA; ++pass) {
      const int row = row_ + pass * kRowsPerPass;
      a_[pass] = zeros();
      if (kd_valid && m0_ + row < gemm_m) {
        const int64_t offset = input_offset(g, pixels_[row], tap, grp_);
        if (offset >= 0) a_[pass] = *reinterpret_cast<const Vec*>(x + offset);
      }
    }

    const T* weight = static_cast<const T*>(args_.weight);
    const int64_t k_per_group = g.k_per_group();
#pragma unroll
    for (int pass = 0; pass < kPassesB; ++pass) {
      const int64_t k_in_group = n0_ + row_ + pass * kRowsPerPass;
      b_[pass] = zeros();
      if (kd_valid && k_in_group < k_per_group) {
        const int64_t k = grp_ * k_per_group + k_in_group;
        b_[pass] = *reinterpret_cast<const Vec*>(weight + weight_offset(g, k, kd));
      }
    }
  }

  __device__ void stage(T* a_tile, T* b_tile) const {
    constexpr int kPitch = kOperandPitch<T>;
#pragma unroll
    for (int pass = 0; pass < kPassesA; ++pass) {
      store(a_tile + (row_ + pass * kRowsPerPass) * kPitch + col_, a_[pass]);
    }
#pragma unroll
    for (int pass = 0; pass < kPassesB; ++pass) {
      store(b_tile + (row_ + pass * kRowsPerPass) * kPitch + col_, b_[pass]);
    }
  }

 private:
  using Vec = Packed<T, kVec>;
  static_assert(!kRoundToTf32 || std::is_same_v<T, float>, "tf32 rounding is for fp32 only");

  __device__ static Vec zeros() {
    Vec v;
#pragma unroll
    for (int i = 0; i < kVec; ++i) v.v[i] = from_float<T>(0.f);
    return v;
  }

  __device__ static void store(T* dst, Vec v) {
    if constexpr (kRoundToTf32) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v.v[i] = wmma::__float_to_tf32(v.v[i]);
    }
    *reinterpret_cast<Vec*>(dst) = v;
  }

  const ConvBnActArgs& args_;
  const PixelIndex* pixels_;
  const int64_t m0_, n0_, grp_;
  const int col_;  // first Kd column of this thread within the slice
  const int row_;  // first tile row of this thread; further rows every kRowsPerPass
  Vec a_[kPassesA];
  Vec b_[kPassesB];
};

// Tensor-core math on WMMA fragments: 16-bit operands with k = 16, or tf32 with k = 8.
template <typename T, typename FragElem, int kMmaK>
class WmmaMath {
 public:
  __device__ WmmaMath()
      : warp_m_(static_cast<int>(threadIdx.x) / 32 / kWarpsN),
        warp_n_(static_cast<int>(threadIdx.x) / 32 % kWarpsN) {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc_[i][j], 0.f);
    }
  }

  __device__ void accumulate(const T* a_tile, const T* b_tile) {
    constexpr int kPitch = kOperandPitch<T>;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kMmaK) {
      FragA a[kFragsM];
      FragB b[kFragsN];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        wmma::load_matrix_sync(a[i], a_tile + (row0() + i * 16) * kPitch + kk, kPitch);
      }
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        wmma::load_matrix_sync(b[j], b_tile + (col0() + j * 16) * kPitch + kk, kPitch);
      }
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc_[i][j], a[i], b[j], acc_[i][j]);
      }
    }
  }

  __device__ void store(float* acc_tile) const {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        wmma::store_matrix_sync(acc_tile + (row0() + i * 16) * kAccPitch + col0() + j * 16,
                                acc_[i][j], kAccPitch, wmma::mem_row_major);
      }
    }
  }

 private:
  static constexpr int kFragsM = kBlockM / kWarpsM / 16;
  static constexpr int kFragsN = kBlockN / kWarpsN / 16;
  static_assert(kBlockK % kMmaK == 0, "slice must hold whole MMA steps");
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kMmaK, FragElem, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kMmaK, FragElem, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, kMmaK, float>;

  __device__ int row0() const { return warp_m_ * (kBlockM / kWarpsM); }
  __device__ int col0() const { return warp_n_ * (kBlockN / kWarpsN); }

  const int warp_m_, warp_n_;
  FragC acc_[kFragsM][kFragsN];
};

// Exact fp32 on the CUDA cores. Thread (ty, tx) of a 16 x 8 grid owns rows ty + 16 i and
// columns tx + 8 j: a warp then reads 4 A rows and 8 B rows per step, all in distinct banks.
class SimtMath {
 public:
  __device__ SimtMath()
      : ty_(static_cast<int>(threadIdx.x) / kThreadsN),
        tx_(static_cast<int>(threadIdx.x) % kThreadsN) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc_[i][j] = 0.f;
    }
  }

  __device__ void accumulate(const float* a_tile, const float* b_tile) {
    constexpr int kPitch = kOperandPitch<float>;
#pragma unroll 8
    for (int kk = 0; kk < kBlockK; ++kk) {
      float a[kRows];
      float b[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) a[i] = a_tile[(ty_ + i * kThreadsM) * kPitch + kk];
#pragma unroll
      for (int j = 0; j < kCols; ++j) b[j] = b_tile[(tx_ + j * kThreadsN) * kPitch + kk];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc_[i][j] = fmaf(a[i], b[j], acc_[i][j]);
      }
    }
  }

  __device__ void store(float* acc_tile) const {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        acc_tile[(ty_ + i * kThreadsM) * kAccPitch + tx_ + j * kThreadsN] = acc_[i][j];
      }
    }
  }

 private:
  static constexpr int kThreadsN = 8;
  static constexpr int kThreadsM = kThreads / kThreadsN;
  static constexpr int kRows = kBlockM / kThreadsM;
  static constexpr int kCols = kBlockN / kThreadsN;

  const int ty_, tx_;
  float acc_[kRows][kCols];
};

// The operand tiles hold the storage dtype in every mode (tf32 lives in fp32 storage).
template <typename T, MathMode kMode>
struct MathOf;
template <typename T>
struct MathOf<T, MathMode::kTensorCore16> {
  using type = WmmaMath<T, T, 16>;
};
template <>
struct MathOf<float, MathMode::kTensorCoreTf32> {
  using type = WmmaMath<float, wmma::precision::tf32, 8>;
};
template <>
struct MathOf<float, MathMode::kSimtFp32> {
  using type = SimtMath;
};

// One thread per output channel of the tile (scale and shift read once), walking the rows: a
// warp reads one accumulator row without bank conflicts and writes 32 consecutive channels.
template <typename T, bool kRelu>
__device__ void write_output(const ConvBnActArgs& args, const float* acc_tile, int64_t m0,
                             int64_t n0, int64_t grp) {
  static_assert(kThreads % kBlockN == 0, "whole rows per pass");
  const ConvGeometry& g = args.geom;
  const int col = static_cast<int>(threadIdx.x) % kBlockN;
  const int64_t k_in_group = n0 + col;
  if (k_in_group >= g.k_per_group()) return;
  const int64_t k = grp * g.k_per_group() + k_in_group;
  const float scale = args.scale != nullptr ? args.scale[k] : 1.f;
  const float shift = args.shift != nullptr ? args.shift[k] : 0.f;
  const T* residual = static_cast<const T*>(args.residual);
  T* out = static_cast<T*>(args.out);
  const int64_t gemm_m = g.gemm_m();

  for (int row = static_cast<int>(threadIdx.x) / kBlockN; row < kBlockM;
       row += kThreads / kBlockN) {
    const int64_t m = m0 + row;
    if (m >= gemm_m) break;
    const int64_t offset = m * g.K + k;
    const float res = residual != nullptr ? to_float(residual[offset]) : 0.f;
    out[offset] = from_float<T>(bn_act<kRelu>(acc_tile[row * kAccPitch + col], scale, shift, res));
  }
}

template <typename T, MathMode kMode, int kVec, bool kRelu>
__global__ void __launch_bounds__(kThreads) conv_bn_act_kernel(const ConvBnActArgs args) {
  using Math = typename MathOf<T, kMode>::type;
  constexpr bool kRoundToTf32 = kMode == MathMode::kTensorCoreTf32;

  __shared__ __align__(128) unsigned char tile_storage[kTileBytes<T>];
  __shared__ PixelIndex pixels[kBlockM];
  T* a_tile = reinterpret_cast<T*>(tile_storage);
  T* b_tile = a_tile + kBlockM * kOperandPitch<T>;
  float* acc_tile = reinterpret_cast<float*>(tile_storage);

  const ConvGeometry& g = args.geom;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const int64_t grp = blockIdx.z;

  for (int row = threadIdx.x; row < kBlockM; row += kThreads) {
    if (m0 + row < g.gemm_m()) pixels[row] = pixel_of_row(g, m0 + row);
  }
  __syncthreads();

  OperandStager<T, kVec, kRoundToTf32> stager(args, pixels, m0, n0, grp);
  Math math;
  const int64_t gemm_k = g.gemm_k();
  // Only the wide gather prefetches: the one-element gather holds 48 registers per thread, which
  // on top of the live fragments would spill.
  constexpr bool kPrefetch = kVec > 1;
  if constexpr (kPrefetch) stager.gather(0);
  for (int64_t k0 = 0; k0 < gemm_k; k0 += kBlockK) {
    if constexpr (!kPrefetch) stager.gather(k0);
    stager.stage(a_tile, b_tile);
    __syncthreads();
    if constexpr (kPrefetch) {
      if (k0 + kBlockK < gemm_k) stager.gather(k0 + kBlockK);
    }
    math.accumulate(a_tile, b_tile);
    __syncthreads();
  }

  math.store(acc_tile);
  __syncthreads();
  write_output<T, kRelu>(args, acc_tile, m0, n0, grp);
}

template <typename T, MathMode kMode, int kVec>
int launch_kernel(const ConvBnActArgs& args, dim3 grid, cudaStream_t stream) {
  if (args.relu) {
    conv_bn_act_kernel<T, kMode, kVec, true><<<grid, kThreads, 0, stream>>>(args);
  } else {
    conv_bn_act_kernel<T, kMode, kVec, false><<<grid, kThreads, 0, stream>>>(args);
  }
  return static_cast<int>(cudaGetLastError());
}

bool is_aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

template <typename T, MathMode kMode>
int launch_for_math(const ConvBnActArgs& args, dim3 grid, cudaStream_t stream) {
  // 16-byte gathers need whole vectors per tap (Cg % kWide == 0, which also makes every element
  // offset a multiple of kWide) and 16-byte aligned base pointers.
  constexpr int kWide = 16 / sizeof(T);
  const bool wide = args.geom.c_per_group() % kWide == 0 && is_aligned(args.x, 16) &&
                    is_aligned(args.weight, 16);
  return wide ? launch_kernel<T, kMode, kWide>(args, grid, stream)
              : launch_kernel<T, kMode, 1>(args, grid, stream);
}

template <typename T>
int launch_for_dtype(const ConvBnActArgs& args, dim3 grid, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return args.allow_tf32 ? launch_for_math<float, MathMode::kTensorCoreTf32>(args, grid, stream)
                           : launch_for_math<float, MathMode::kSimtFp32>(args, grid, stream);
  } else {
    return launch_for_math<T, MathMode::kTensorCore16>(args, grid, stream);
  }
}

}  // namespace

int launch_conv_bn_act(const ConvBnActArgs& args, cudaStream_t stream) {
  const ConvGeometry& g = args.geom;
  if (g.groups <= 0 || g.C % g.groups != 0 || g.K % g.groups != 0) return cudaErrorInvalidValue;
  const int64_t gemm_m = g.gemm_m();
  const int64_t k_per_group = g.k_per_group();
  if (gemm_m <= 0 || k_per_group <= 0) return cudaSuccess;
  // With no reduction (C == 0) x and weight are empty and never read.
  const bool has_operands = args.x != nullptr && args.weight != nullptr;
  if (args.out == nullptr || (g.gemm_k() > 0 && !has_operands)) return cudaErrorInvalidValue;

  const int64_t blocks_m = (gemm_m + kBlockM - 1) / kBlockM;
  const int64_t blocks_n = (k_per_group + kBlockN - 1) / kBlockN;
  if (blocks_m > INT32_MAX || blocks_n > 65535 || g.groups > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(blocks_n),
                  static_cast<unsigned>(g.groups));

  switch (args.dtype) {
    case DType::kFloat32:
      return launch_for_dtype<float>(args, grid, stream);
    case DType::kFloat16:
      return launch_for_dtype<__half>(args, grid, stream);
    case DType::kBFloat16:
      return launch_for_dtype<__nv_bfloat16>(args, grid, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedres::cuda
