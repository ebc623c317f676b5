// The implicit-GEMM convolution main loop of the fused conv kernels (.cu only), templated on a
// prologue (applied to input elements as they are loaded) and an epilogue (what happens to the
// fp32 output tile). conv_bn_act_cuda.cu and conv_bn_stats_cuda.cu instantiate it.
//
// Design: out[M x Kper] = im2col(x)[M x Kd] * W^T[Kd x Kper] per group, with
//   M = N*P*Q output pixels, Kper = K/groups output channels, Kd = R*S*Cg (C fastest, as KRSC).
// - Grid (ceil(M/128), ceil(Kper/64), groups): a block owns a 128 x 64 output tile of one group,
//   so it never straddles groups and reads one contiguous Cg-wide slice of every input pixel.
// - 128 threads (4 warps). Per BK = 32 slice of Kd, every thread gathers its share of the A tile
//   (128 x 32 im2col rows, zero for padding taps and for rows/columns past the problem) and of
//   the B tile (64 x 32 weight rows) into registers, then into shared memory stored [row][Kd]:
//   A row-major, B as the column-major Kd x 64 operand.
// - The prologue transforms in-bounds input elements between gather and stage; padding taps and
//   out-of-range rows stay exactly 0 (a padding tap is a zero of the activated tensor).
// - A thread's Kd column is fixed within a slice, so tap_of_col (the only division) runs once per
//   slice, and the (n, p, q) of the block's 128 pixels are decoded once into shared memory.
// - Wide path, when Cg % (16 B / element size) == 0 and x, weight are 16 B aligned (every
//   ResNet conv but the 3-channel stem): a thread moves 16 B (one tap, consecutive channels) per
//   load, 6 (fp16/bf16) or 12 (fp32) loads per slice, and gathers slice i+1 into registers
//   before the math on slice i, so the global loads overlap the MMAs. Otherwise one element per
//   load (48 per slice), loaded just before staging: prefetching those too would spill.
// - Math (cuda_tile_math.cuh, shared with the backward convs), per dtype: fp16/bf16 -> WMMA
//   m16n16k16 with fp32 accumulators; fp32 with allow_tf32 -> WMMA m16n16k8 tf32 (operands
//   rounded to tf32 once, when staged to shared memory); fp32 without -> SIMT fmaf (exact fp32, as cuDNN with TF32 off). Tensor-core warps own a 64 x 32
//   sub-tile (4 x 2 fragments); SIMT threads own 8 x 8 outputs strided by 16 rows / 8 columns,
//   which keeps their shared-memory reads free of bank conflicts.
// - Epilogue: accumulators go to a 128 x 64 fp32 tile in shared memory (aliasing the operand
//   tiles), which the epilogue functor reads (and may overwrite) after a barrier.
// - Shared memory per block: operand tiles 15,360 B (fp16/bf16) or 27,648 B (fp32), aliased by
//   the 34,816 B accumulator tile, plus 3,072 B of decoded pixels: 37,888 B, leaving the
//   epilogue room under the 48 KB of static shared memory (no opt-in attribute needed).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "fusedres/conv_geometry.h"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launch.h"
#include "fusedres/cuda_tile_math.cuh"
#include "fusedres/cuda_vector.cuh"
#include "fusedres/epilogue.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the implicit-GEMM conv kernels need sm_80+ (bf16 and tf32 WMMA); set TORCH_CUDA_ARCH_LIST"
#endif

namespace fusedres::cuda::implicit_gemm {

namespace wmma = nvcuda::wmma;
using namespace tile_math;

// Both operands are staged [row][Kd]: A row-major, B as the column-major Kd x 64 operand, with
// the same row pitch.
template <typename T>
using LayoutA = OperandLayout<T, kBlockM, /*kReductionContiguous=*/true>;
template <typename T>
using LayoutB = OperandLayout<T, kBlockN, /*kReductionContiguous=*/true>;
template <typename T>
constexpr int kOperandPitch = LayoutA<T>::pitch;
static_assert(LayoutA<float>::pitch == LayoutB<float>::pitch, "A and B share a row pitch");

template <typename T>
constexpr int kOperandBytes =
    tile_math::kOperandBytes<T, kBlockM, LayoutA<T>> + tile_math::kOperandBytes<T, kBlockN, LayoutB<T>>;
template <typename T>
constexpr int kTileBytes = kOperandBytes<T> > kAccBytes ? kOperandBytes<T> : kAccBytes;

// The GEMM operands, passed as one kernel parameter: the main loop reads them from parameter
// space instead of holding copies in registers.
template <typename T>
struct ConvInputs {
  ConvGeometry geom;
  const T* x;       // N x H x W x C (NHWC, dense)
  const T* weight;  // K x R x S x C/groups (KRSC, dense)
};

// The input as stored.
struct IdentityPrologue {
  template <int kVec>
  struct Channels {};

  template <int kVec>
  __device__ Channels<kVec> load(int64_t) const {
    return {};
  }
  template <typename T, int kVec>
  __device__ void apply(Packed<T, kVec>&, const Channels<kVec>&) const {}
};

// The previous layer's BN+ReLU, relu(x * scale[c] + shift[c]), rounded to the storage type as the
// reference rounds the activation it feeds to the conv. A thread's kVec elements are consecutive
// input channels, whose scale and shift it loads with the x it gathers.
struct BnReluPrologue {
  const float* scale;  // C, fp32
  const float* shift;  // C, fp32

  template <int kVec>
  struct Channels {
    float scale[kVec];
    float shift[kVec];
  };

  template <int kVec>
  __device__ Channels<kVec> load(int64_t c) const {
    Channels<kVec> ch;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      ch.scale[i] = __ldg(scale + c + i);
      ch.shift[i] = __ldg(shift + c + i);
    }
    return ch;
  }
  template <typename T, int kVec>
  __device__ void apply(Packed<T, kVec>& v, const Channels<kVec>& ch) const {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      v.v[i] = from_float<T>(bn_relu(to_float(v.v[i]), ch.scale[i], ch.shift[i]));
    }
  }
};

// Gathers one kBlockK-wide slice of a block's two GEMM operands from global memory into
// registers (gather), then writes it to the shared-memory tiles (stage). Splitting the two lets
// the loads of the next slice be in flight while the current one is multiplied; the prologue
// runs at stage time, when those loads have landed.
// With kRoundToTf32 (fp32 on tensor cores) each element is rounded to tf32 as it is staged, once,
// instead of in every warp fragment that later reads it.
template <typename T, int kVec, bool kRoundToTf32, typename Prologue>
class OperandStager {
 public:
  static constexpr int kVecsPerRow = kBlockK / kVec;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
  static constexpr int kPassesA = kBlockM / kRowsPerPass;
  static constexpr int kPassesB = kBlockN / kRowsPerPass;
  static_assert(kBlockK % kVec == 0 && kThreads % kVecsPerRow == 0, "tile shape");
  static_assert(kBlockN % kRowsPerPass == 0, "tile shape");
  static_assert(kPassesA <= 32, "one in-bounds bit per A pass");

  __device__ OperandStager(const ConvInputs<T>& in, const Prologue& prologue,
                           const PixelIndex* pixels, int64_t m0, int64_t n0, int64_t grp)
      : in_(in),
        prologue_(prologue),
        pixels_(pixels),
        m0_(m0),
        n0_(n0),
        grp_(grp),
        col_(static_cast<int>(threadIdx.x) % kVecsPerRow * kVec),
        row_(static_cast<int>(threadIdx.x) / kVecsPerRow) {}

  // Requires Cg % kVec == 0 when kVec > 1: the kVec columns then share one (r, s) tap, are
  // contiguous in x and in the weight, and are all inside or all outside Kd.
  __device__ void gather(int64_t k0) {
    const ConvGeometry& g = in_.geom;
    const int64_t kd = k0 + col_;
    const bool kd_valid = kd < g.gemm_k();
    TapIndex tap{0, 0, 0};
    if (kd_valid) {
      tap = tap_of_col(g, kd);
      channels_ = prologue_.template load<kVec>(grp_ * g.c_per_group() + tap.c);
    }

    const int64_t gemm_m = g.gemm_m();
    in_bounds_ = 0;
#pragma unroll
    for (int pass = 0; pass < kPassesA; ++pass) {
      const int row = row_ + pass * kRowsPerPass;
      a_[pass] = zeros();
      if (kd_valid && m0_ + row < gemm_m) {
        const int64_t offset = input_offset(g, pixels_[row], tap, grp_);
        if (offset >= 0) {
          a_[pass] = load_packed<T, kVec>(in_.x + offset);
          in_bounds_ |= 1u << pass;
        }
      }
    }

    const int64_t k_per_group = g.k_per_group();
#pragma unroll
    for (int pass = 0; pass < kPassesB; ++pass) {
      const int64_t k_in_group = n0_ + row_ + pass * kRowsPerPass;
      b_[pass] = zeros();
      if (kd_valid && k_in_group < k_per_group) {
        const int64_t k = grp_ * k_per_group + k_in_group;
        b_[pass] = load_packed<T, kVec>(in_.weight + weight_offset(g, k, kd));
      }
    }
  }

  __device__ void stage(T* a_tile, T* b_tile) const {
    constexpr int kPitch = kOperandPitch<T>;
#pragma unroll
    for (int pass = 0; pass < kPassesA; ++pass) {
      Vec a = a_[pass];
      if (in_bounds_ >> pass & 1u) prologue_.apply(a, channels_);
      store(a_tile + (row_ + pass * kRowsPerPass) * kPitch + col_, a);
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
    store_packed(dst, v);
  }

  const ConvInputs<T>& in_;
  const Prologue& prologue_;
  const PixelIndex* pixels_;
  const int64_t m0_, n0_, grp_;
  const int col_;  // first Kd column of this thread within the slice
  const int row_;  // first tile row of this thread; further rows every kRowsPerPass
  Vec a_[kPassesA];
  Vec b_[kPassesB];
  typename Prologue::template Channels<kVec> channels_;  // of this thread's Kd columns
  uint32_t in_bounds_;  // bit `pass`: a_[pass] was read from x (not padding or past the rows)
};

// The block's output tile, as the epilogue sees it: tile(row, col) is output pixel m0 + row
// (decoded as pixels[row], for rows inside the problem), channel grp * Kper + n0 + col, in fp32
// with pitch kAccPitch.
struct OutputTile {
  float* acc;
  const PixelIndex* pixels;
  int64_t m0, n0, grp;
};

// Epilogue: `__device__ void operator()(const ConvGeometry&, const OutputTile&) const`, called by
// every thread of the block after the tile is complete (it may use __syncthreads), and
// `static constexpr int kSharedBytes`, the static shared memory it declares.
template <typename T, MathMode kMode, int kVec, typename Prologue, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    conv_kernel(const ConvInputs<T> in, const Prologue prologue, const Epilogue epilogue) {
  using Math = typename MathOf<T, kMode, LayoutA<T>, LayoutB<T>>::type;
  constexpr bool kRoundToTf32 = kMode == MathMode::kTensorCoreTf32;

  __shared__ __align__(128) unsigned char tile_storage[kTileBytes<T>];
  __shared__ PixelIndex pixels[kBlockM];
  static_assert(sizeof(tile_storage) + sizeof(pixels) + Epilogue::kSharedBytes <=
                    kMaxStaticSharedBytes,
                "static shared memory of conv_kernel");
  T* a_tile = reinterpret_cast<T*>(tile_storage);
  T* b_tile = a_tile + kBlockM * kOperandPitch<T>;
  float* acc_tile = reinterpret_cast<float*>(tile_storage);

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const int64_t grp = blockIdx.z;
  const ConvGeometry& g = in.geom;

  for (int row = threadIdx.x; row < kBlockM; row += kThreads) {
    if (m0 + row < g.gemm_m()) pixels[row] = pixel_of_row(g, m0 + row);
  }
  __syncthreads();

  OperandStager<T, kVec, kRoundToTf32, Prologue> stager(in, prologue, pixels, m0, n0, grp);
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
  epilogue(g, OutputTile{acc_tile, pixels, m0, n0, grp});
}

// Output tiles along M: the grid's x extent, and the number of per-tile partials an epilogue
// that reduces over rows writes per channel.
inline int64_t num_row_tiles(const ConvGeometry& g) { return (g.gemm_m() + kBlockM - 1) / kBlockM; }

template <typename T, MathMode kMode, int kVec, typename Prologue, typename Epilogue>
int launch_kernel(const ConvGeometry& g, const void* x, const void* weight,
                  const Prologue& prologue, const Epilogue& epilogue, dim3 grid,
                  cudaStream_t stream) {
  const ConvInputs<T> in{g, static_cast<const T*>(x), static_cast<const T*>(weight)};
  FUSEDRES_LAUNCH(grid, kThreads, 0, stream, conv_kernel<T, kMode, kVec, Prologue, Epilogue>)(
      in, prologue, epilogue);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, MathMode kMode, typename Prologue, typename Epilogue>
int launch_for_math(const ConvGeometry& g, const void* x, const void* weight,
                    const Prologue& prologue, const Epilogue& epilogue, dim3 grid,
                    cudaStream_t stream) {
  // 16-byte gathers need whole vectors per tap (Cg % kWide == 0, which also makes every element
  // offset a multiple of kWide) and 16-byte aligned base pointers.
  constexpr int kWide = kWideVec<T>;
  const bool wide = g.c_per_group() % kWide == 0 && is_aligned(x, 16) && is_aligned(weight, 16);
  return wide ? launch_kernel<T, kMode, kWide>(g, x, weight, prologue, epilogue, grid, stream)
              : launch_kernel<T, kMode, 1>(g, x, weight, prologue, epilogue, grid, stream);
}

// Launches the conv kernel for storage type T: picks the math mode (tensor cores for fp16/bf16,
// tf32 or exact SIMT for fp32) and the gather width. The caller has checked the geometry
// (groups divide C and K, M and Kper > 0) and the pointers.
template <typename T, typename Prologue, typename Epilogue>
int launch(const ConvGeometry& g, const void* x, const void* weight, bool allow_tf32,
           const Prologue& prologue, const Epilogue& epilogue, cudaStream_t stream) {
  const int64_t blocks_m = num_row_tiles(g);
  const int64_t blocks_n = (g.k_per_group() + kBlockN - 1) / kBlockN;
  if (blocks_m > INT32_MAX || blocks_n > 65535 || g.groups > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(blocks_n),
                  static_cast<unsigned>(g.groups));
  if constexpr (std::is_same_v<T, float>) {
    return allow_tf32 ? launch_for_math<float, MathMode::kTensorCoreTf32>(
                            g, x, weight, prologue, epilogue, grid, stream)
                      : launch_for_math<float, MathMode::kSimtFp32>(g, x, weight, prologue,
                                                                    epilogue, grid, stream);
  } else {
    return launch_for_math<T, MathMode::kTensorCore16>(g, x, weight, prologue, epilogue, grid,
                                                       stream);
  }
}

}  // namespace fusedres::cuda::implicit_gemm
