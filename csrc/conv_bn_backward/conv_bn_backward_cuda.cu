// conv_bn_backward on CUDA: the conv's dgrad and wgrad as tiled implicit GEMMs with BN backward
// fused around them (fusedres/ops/_ref.py::conv_bn_backward is the spec; conv_backward_geometry.h
// the index math). Deterministic: no float atomics; every sum runs in an order fixed by the shapes.
//
// Both GEMMs share one block shape with conv_bn_act's implicit_gemm.cuh: a 128 x 64 output tile,
// 128 threads (4 warps of 64 x 32), slices of kBlockK = 32 along the reduction, fp16/bf16 WMMA
// with fp32 accumulators, tf32 WMMA (operands rounded once, when staged) or exact SIMT fmaf for
// fp32. Unlike the forward, the operands are staged in whichever layout their global memory is
// contiguous in, so 16-byte loads go to shared memory unshuffled: B is always [reduction][col]
// (row-major), A is [row][reduction] for the dgrad and [reduction][row] for the wgrad.
//
// dy, the gradient both GEMMs consume, is `grad` or, with grad_coef, bn_backward_elem(grad,
// grad_y) with the per-channel constants of grad_coef's rows (batchnorm.h), computed as each
// element is staged and rounded to the storage type as the reference rounds it; never written. Elements that do not exist (a dgrad tap no
// output pixel reaches, rows past the problem) are staged as exact zeros, not prologue(0).
//
// Kernel 1, dgrad: grid (ceil(N*H*W / 128), ceil(Cg / 64), groups). Row m is input pixel
// (n, h, w); reduction j = (r, s, k) over R*S*Kper; A[m][j] = dy at the output pixel that reaches
// (h, w) through tap (r, s), if any; B[j][c] = W[k, r, s, c]. A stride-2 conv spends 3/4 of its
// MMAs on zero taps: simple and exact, not cuDNN's per-phase decomposition. Epilogue: thread
// (lane, col) of 2 x 64 owns channel col and every other row; it rounds and stores grad_input and,
// with scale_in, first masks it by x*scale_in + shift_in > 0 and sums g and g*xhat of the stored
// values; the two lanes are added in order and the block writes one partial per channel per row
// tile. Kernel 2 adds a channel's tile partials in a fixed order (in double).
//
// Kernel 3, wgrad: grid (ceil(Kper / 128), ceil(R*S*Cg / 64), groups * splits). Rows are output
// channels, columns the forward's Kd = (r, s, c), and the N*P*Q reduction is cut into `splits`
// chunks of whole slices; A[i][k] = dy[i][k], B[i][j] = relu(x*scale_in + shift_in) (or x) at
// the input element output pixel i reads through tap j, 0 for padding taps. Each block writes its
// fp32 tile to workspace[split][K][R*S*Cg]; kernel 4 adds the splits in order per weight element
// and writes it in the weight's (K, Cg, R, S) layout and dtype.
//
// Wide path, when Kper and Cg are multiples of 16 B / element size and the pointers 16 B aligned
// (every ResNet conv but the 3-channel stem): a thread moves 16 B per load, and gathers slice i+1
// into registers before the math on slice i (except the tf32 wgrad, which would spill). Otherwise
// one element per load, gathered just before it is staged. Registers: 160-255 per thread, no
// spills (ptxas -v, sm_80 and sm_90), as the forward kernels of implicit_gemm.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fusedres/batchnorm.h"
#include "fusedres/conv_backward_geometry.h"
#include "fusedres/conv_geometry.h"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launch.h"
#include "fusedres/cuda_launchers.h"
#include "fusedres/cuda_tile_math.cuh"
#include "fusedres/cuda_vector.cuh"
#include "fusedres/epilogue.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the conv backward kernels need sm_80+ (bf16 and tf32 WMMA); set TORCH_CUDA_ARCH_LIST"
#endif

namespace fusedres::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using namespace tile_math;

// Operand layouts: B is [red][col] in both GEMMs (dgrad: the weight's C is contiguous; wgrad:
// x's channels are); A is [row][red] for the dgrad (dy's K is contiguous) and [red][row] for the
// wgrad (dy's K, the wgrad rows, is contiguous).
template <typename T, bool kAColMajor>
using LayoutA = OperandLayout<T, kBlockM, /*kReductionContiguous=*/!kAColMajor>;
template <typename T>
using LayoutB = OperandLayout<T, kBlockN, /*kReductionContiguous=*/false>;
template <typename T, bool kAColMajor>
constexpr int kPitchA = LayoutA<T, kAColMajor>::pitch;
template <typename T>
constexpr int kPitchB = LayoutB<T>::pitch;

template <typename T, bool kAColMajor>
constexpr int kABytes = tile_math::kOperandBytes<T, kBlockM, LayoutA<T, kAColMajor>>;
template <typename T>
constexpr int kBBytes = tile_math::kOperandBytes<T, kBlockN, LayoutB<T>>;
template <typename T, bool kAColMajor>
constexpr int kTileBytes = kABytes<T, kAColMajor> + kBBytes<T> > kAccBytes
                               ? kABytes<T, kAColMajor> + kBBytes<T>
                               : kAccBytes;
static_assert(kABytes<__half, false> % 32 == 0 && kABytes<__half, true> % 32 == 0 &&
                  kABytes<float, false> % 32 == 0 && kABytes<float, true> % 32 == 0,
              "B tile must start 32-byte aligned");
template <typename T, MathMode kMode, bool kAColMajor>
using MathFor = typename MathOf<T, kMode, LayoutA<T, kAColMajor>, LayoutB<T>>::type;

// Epilogue threads: column col = tid % kBlockN, every kRowLanes-th row from lane = tid / kBlockN.
constexpr int kRowLanes = kThreads / kBlockN;
static_assert(kThreads % kBlockN == 0, "whole rows per pass");

constexpr int kMergeChannels = 32;
constexpr int kMergeLanes = 16;

// wgrad split-K: aim for this many blocks (a shape-only rule, so results do not depend on the
// GPU), with at least kMinSlicesPerSplit slices per split and at most kMaxSplits partials.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinSlicesPerSplit = 8;
constexpr int64_t kMaxSplits = 128;

template <typename T, int kVec>
__device__ __forceinline__ Packed<T, kVec> zeros() {
  Packed<T, kVec> v;
#pragma unroll
  for (int i = 0; i < kVec; ++i) v.v[i] = from_float<T>(0.f);
  return v;
}

// Stores an operand vector to shared memory, rounded to tf32 first on the tf32 path.
template <bool kRoundToTf32, typename T, int kVec>
__device__ __forceinline__ void store_operand(T* dst, Packed<T, kVec> v) {
  if constexpr (kRoundToTf32) {
    static_assert(std::is_same_v<T, float>, "tf32 rounding is for fp32 only");
#pragma unroll
    for (int i = 0; i < kVec; ++i) v.v[i] = wmma::__float_to_tf32(v.v[i]);
  }
  store_packed(dst, v);
}

// dy as both GEMMs read it.
template <typename T>
struct GradOperand {
  const T* grad;       // N*P*Q x K
  const T* grad_y;     // N*P*Q x K, read only with coef
  const float* coef;   // 4 x K rows (mean, grad_scale, mean_g, xhat_coef), or nullptr
};

// dy for output channels k .. k + kVec - 1 from the loaded grad (and grad_y).
template <bool kCoef, typename T, int kVec>
__device__ __forceinline__ Packed<T, kVec> grad_prologue(const GradOperand<T>& dy, int64_t K,
                                                         const Packed<T, kVec>& grad,
                                                         const Packed<T, kVec>& grad_y,
                                                         int64_t k) {
  if constexpr (!kCoef) {
    return grad;
  } else {
    Packed<T, kVec> out;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const BnBackwardChannel ch{__ldg(dy.coef + k + i), __ldg(dy.coef + K + k + i),
                                 __ldg(dy.coef + 2 * K + k + i), __ldg(dy.coef + 3 * K + k + i)};
      out.v[i] = from_float<T>(bn_backward_elem(to_float(grad.v[i]), to_float(grad_y.v[i]), ch));
    }
    return out;
  }
}


// The dy elements one thread gathers per slice (grad and, with kCoef, grad_y), held in
// registers until they are staged through grad_prologue; shared by the dgrad and wgrad A loaders.
template <typename T, int kVec, int kPasses, bool kCoef, bool kRoundToTf32>
class GradRegisters {
 public:
  static_assert(kPasses <= 32, "one loaded bit per pass");

  // Zeroing the registers too (not only the bits) keeps their live ranges per slice: without
  // it ptxas carries the previous slice's values and spills.
  __device__ void clear() {
    loaded_ = 0;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      grad_[pass] = zeros<T, kVec>();
      if constexpr (kCoef) grad_y_[pass] = zeros<T, kVec>();
    }
  }

  __device__ void load(int pass, const GradOperand<T>& dy, int64_t offset) {
    grad_[pass] = load_packed<T, kVec>(dy.grad + offset);
    if constexpr (kCoef) grad_y_[pass] = load_packed<T, kVec>(dy.grad_y + offset);
    loaded_ |= 1u << pass;
  }

  // dy for channels k .. k + kVec - 1 to `dst`; exact zeros where nothing was loaded (taps no
  // output pixel reaches, rows past the problem), not prologue(0).
  __device__ void stage(int pass, const GradOperand<T>& dy, int64_t K, int64_t k, T* dst) const {
    Packed<T, kVec> v = zeros<T, kVec>();
    if (loaded_ >> pass & 1u) v = grad_prologue<kCoef>(dy, K, grad_[pass], grad_y_[pass], k);
    store_operand<kRoundToTf32>(dst, v);
  }

 private:
  uint32_t loaded_;  // bit `pass`: grad_[pass] holds dy elements
  Packed<T, kVec> grad_[kPasses];
  Packed<T, kVec> grad_y_[kPasses];
};

// The block's reduction over [begin, end) in kBlockK slices. With kPrefetch the loaders gather
// slice i+1 into registers while slice i is multiplied. Ends with a barrier, so the caller may
// reuse the operand tiles (as the accumulator tile) right after.
template <bool kPrefetch, typename T, typename LoaderA, typename LoaderB, typename Math>
__device__ __forceinline__ void gemm_main_loop(LoaderA& a, LoaderB& b, Math& math, T* a_tile,
                                               T* b_tile, int64_t begin, int64_t end) {
  if (begin >= end) return;
  if constexpr (kPrefetch) {
    a.gather(begin);
    b.gather(begin);
  }
  for (int64_t k0 = begin; k0 < end; k0 += kBlockK) {
    if constexpr (!kPrefetch) {
      a.gather(k0);
      b.gather(k0);
    }
    a.stage(a_tile);
    b.stage(b_tile);
    __syncthreads();
    if constexpr (kPrefetch) {
      if (k0 + kBlockK < end) {
        a.gather(k0 + kBlockK);
        b.gather(k0 + kBlockK);
      }
    }
    math.accumulate(a_tile, b_tile);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// dgrad

template <typename T>
struct DgradParams {
  ConvGeometry g;
  GradOperand<T> dy;
  const T* weight;            // K x R x S x Cg
  const T* x;                 // read with sums only (mask and xhat)
  const float* scale_in;      // C, with sums only
  const float* shift_in;
  const float* mean_in;
  const float* invstd_in;
  T* grad_input;              // N*H*W x C
  float* partial_sum_g;       // [row tile][C], or nullptr for no mask and no sums
  float* partial_sum_g_xhat;  // [row tile][C]
};

// A[m][j] = dy of the output pixel input pixel m reaches through tap j's (r, s), channel k.
// kVec consecutive j share a tap (Kper % kVec == 0) and are consecutive channels of dy.
template <typename T, int kVec, bool kCoef, bool kRoundToTf32>
class DgradGradLoader {
 public:
  static constexpr int kVecsPerRow = kBlockK / kVec;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
  static constexpr int kPasses = kBlockM / kRowsPerPass;

  __device__ DgradGradLoader(const DgradParams<T>& p, const InputPixel* pixels, int64_t m0,
                             int64_t grp)
      : p_(p),
        pixels_(pixels),
        rows_(p.g.N * p.g.H * p.g.W - m0),
        k_base_(grp * p.g.k_per_group()),
        col_(static_cast<int>(threadIdx.x) % kVecsPerRow * kVec),
        row_(static_cast<int>(threadIdx.x) / kVecsPerRow) {}

  __device__ void gather(int64_t j0) {
    const ConvGeometry& g = p_.g;
    const int64_t j = j0 + col_;
    const bool valid = j < g.R * g.S * g.k_per_group();
    DgradTap tap{0, 0, 0};
    if (valid) tap = dgrad_tap_of_col(g, j);
    k_ = k_base_ + tap.k;
    regs_.clear();
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int row = row_ + pass * kRowsPerPass;
      if (valid && row < rows_) {
        const int64_t src = dgrad_source_row(g, pixels_[row], tap.r, tap.s);
        if (src >= 0) regs_.load(pass, p_.dy, src * g.K + k_);
      }
    }
  }

  __device__ void stage(T* a_tile) const {
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      regs_.stage(pass, p_.dy, p_.g.K, k_,
                  a_tile + (row_ + pass * kRowsPerPass) * kPitchA<T, false> + col_);
    }
  }

 private:
  const DgradParams<T>& p_;
  const InputPixel* pixels_;
  const int64_t rows_;    // rows of the problem from this tile's first
  const int64_t k_base_;  // first output channel of the group
  const int col_, row_;
  int64_t k_;             // output channel of this thread's columns in the current slice
  GradRegisters<T, kVec, kPasses, kCoef, kRoundToTf32> regs_;
};

// B[j][c] = W[k, r, s, c] for reduction index j = (r, s, k); kVec consecutive input channels.
template <typename T, int kVec, bool kRoundToTf32>
class DgradWeightLoader {
 public:
  static constexpr int kVecsPerRow = kBlockN / kVec;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
  static constexpr int kPasses = kBlockK / kRowsPerPass;
  static_assert(kBlockK % kRowsPerPass == 0, "tile shape");

  __device__ DgradWeightLoader(const DgradParams<T>& p, int64_t n0, int64_t grp)
      : p_(p),
        grp_(grp),
        c_(n0 + static_cast<int>(threadIdx.x) % kVecsPerRow * kVec),
        col_(static_cast<int>(threadIdx.x) % kVecsPerRow * kVec),
        row_(static_cast<int>(threadIdx.x) / kVecsPerRow) {}

  __device__ void gather(int64_t j0) {
    const ConvGeometry& g = p_.g;
    const int64_t kper = g.k_per_group();
    const int64_t cg = g.c_per_group();
    const int64_t reduction = g.R * g.S * kper;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int64_t j = j0 + row_ + pass * kRowsPerPass;
      b_[pass] = zeros<T, kVec>();
      if (c_ < cg && j < reduction) {
        const DgradTap tap = dgrad_tap_of_col(g, j);
        const int64_t kd = (tap.r * g.S + tap.s) * cg + c_;
        b_[pass] = load_packed<T, kVec>(p_.weight + weight_offset(g, grp_ * kper + tap.k, kd));
      }
    }
  }

  __device__ void stage(T* b_tile) const {
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      store_operand<kRoundToTf32>(b_tile + (row_ + pass * kRowsPerPass) * kPitchB<T> + col_,
                                  b_[pass]);
    }
  }

 private:
  const DgradParams<T>& p_;
  const int64_t grp_;
  const int64_t c_;  // first input channel (within the group) of this thread's columns
  const int col_, row_;
  Packed<T, kVec> b_[kPasses];
};

template <typename T, MathMode kMode, int kVec, bool kCoef>
__global__ void __launch_bounds__(kThreads)
    dgrad_kernel(const __grid_constant__ DgradParams<T> p) {
  using Math = MathFor<T, kMode, false>;
  constexpr bool kRoundToTf32 = kMode == MathMode::kTensorCoreTf32;

  __shared__ __align__(128) unsigned char tile_storage[kTileBytes<T, false>];
  __shared__ InputPixel pixels[kBlockM];
  __shared__ float lane_sums[2][kRowLanes][kBlockN];
  static_assert(sizeof(tile_storage) + sizeof(pixels) + sizeof(lane_sums) <= kMaxStaticSharedBytes,
                "static shared memory of dgrad_kernel");
  T* a_tile = reinterpret_cast<T*>(tile_storage);
  T* b_tile = reinterpret_cast<T*>(tile_storage + kABytes<T, false>);
  float* acc_tile = reinterpret_cast<float*>(tile_storage);

  const ConvGeometry& g = p.g;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const int64_t grp = blockIdx.z;
  const int64_t gemm_m = g.N * g.H * g.W;
  const int rows = static_cast<int>(gemm_m - m0 < kBlockM ? gemm_m - m0 : kBlockM);

  for (int row = threadIdx.x; row < rows; row += kThreads) {
    pixels[row] = input_pixel_of_row(g, m0 + row);
  }
  __syncthreads();

  DgradGradLoader<T, kVec, kCoef, kRoundToTf32> a(p, pixels, m0, grp);
  DgradWeightLoader<T, kVec, kRoundToTf32> b(p, n0, grp);
  Math math;
  gemm_main_loop<(kVec > 1)>(a, b, math, a_tile, b_tile, 0, g.R * g.S * g.k_per_group());
  math.store(acc_tile);
  __syncthreads();

  const int col = static_cast<int>(threadIdx.x) % kBlockN;
  const int lane = static_cast<int>(threadIdx.x) / kBlockN;
  const int64_t cg = g.c_per_group();
  const bool channel_valid = n0 + col < cg;
  const int64_t c = grp * cg + n0 + col;
  const bool with_sums = p.partial_sum_g != nullptr;
  float sum_g = 0.f;
  float sum_g_xhat = 0.f;
  if (channel_valid) {
    if (with_sums) {
      const float scale = p.scale_in[c], shift = p.shift_in[c];
      const float mean = p.mean_in[c], invstd = p.invstd_in[c];
      for (int row = lane; row < rows; row += kRowLanes) {
        const int64_t offset = (m0 + row) * g.C + c;
        const float xv = to_float(p.x[offset]);
        const T stored = from_float<T>(relu_masked_grad<ReluMask::kFromPrologue>(
            acc_tile[row * kAccPitch + col], xv, 0.f, scale, shift));
        p.grad_input[offset] = stored;
        const float gv = to_float(stored);
        sum_g += gv;
        sum_g_xhat += gv * ((xv - mean) * invstd);
      }
    } else {
      for (int row = lane; row < rows; row += kRowLanes) {
        p.grad_input[(m0 + row) * g.C + c] = from_float<T>(acc_tile[row * kAccPitch + col]);
      }
    }
  }
  if (!with_sums) return;
  lane_sums[0][lane][col] = sum_g;
  lane_sums[1][lane][col] = sum_g_xhat;
  __syncthreads();
  if (lane != 0 || !channel_valid) return;
  float tile_g = 0.f;
  float tile_g_xhat = 0.f;
#pragma unroll
  for (int i = 0; i < kRowLanes; ++i) {
    tile_g += lane_sums[0][i][col];
    tile_g_xhat += lane_sums[1][i][col];
  }
  p.partial_sum_g[static_cast<int64_t>(blockIdx.x) * g.C + c] = tile_g;
  p.partial_sum_g_xhat[static_cast<int64_t>(blockIdx.x) * g.C + c] = tile_g_xhat;
}

// Block of 32 channels x 16 lanes: lane l adds tiles l, l + 16, ... of its channel, then lane 0
// adds the 16 lane sums in lane order. In double: free at this size, and thousands of tiles per
// channel then add no visible rounding.
__global__ void __launch_bounds__(kMergeChannels * kMergeLanes)
    merge_sums_kernel(const float* __restrict__ partial_g, const float* __restrict__ partial_g_xhat,
                      float* __restrict__ sum_g, float* __restrict__ sum_g_xhat,
                      int64_t channels, int64_t num_tiles) {
  __shared__ double lane_sums[2][kMergeLanes][kMergeChannels];
  static_assert(sizeof(lane_sums) <= kMaxStaticSharedBytes, "static shared memory");
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kMergeChannels + threadIdx.x;
  const int lane = threadIdx.y;
  double g = 0.0;
  double g_xhat = 0.0;
  if (c < channels) {
    for (int64_t t = lane; t < num_tiles; t += kMergeLanes) {
      g += partial_g[t * channels + c];
      g_xhat += partial_g_xhat[t * channels + c];
    }
  }
  lane_sums[0][lane][threadIdx.x] = g;
  lane_sums[1][lane][threadIdx.x] = g_xhat;
  __syncthreads();
  if (lane != 0 || c >= channels) return;
#pragma unroll
  for (int i = 1; i < kMergeLanes; ++i) {
    g += lane_sums[0][i][threadIdx.x];
    g_xhat += lane_sums[1][i][threadIdx.x];
  }
  sum_g[c] = static_cast<float>(g);
  sum_g_xhat[c] = static_cast<float>(g_xhat);
}

// ---------------------------------------------------------------------------------------------
// wgrad

template <typename T>
struct WgradParams {
  ConvGeometry g;
  GradOperand<T> dy;
  const T* x;                // N x H x W x C
  const float* scale_in;     // C, or nullptr (with shift_in): x as stored
  const float* shift_in;
  float* partials;           // [split][K][R*S*Cg]
  int64_t rows_per_split;    // a multiple of kBlockK
};

// A stored [i][k] (column-major): dy row i (output pixel), kVec consecutive output channels.
template <typename T, int kVec, bool kCoef, bool kRoundToTf32>
class WgradGradLoader {
 public:
  static constexpr int kVecsPerRow = kBlockM / kVec;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
  static constexpr int kPasses = kBlockK / kRowsPerPass;
  static_assert(kRowsPerPass >= 1 && kBlockK % kRowsPerPass == 0, "tile shape");

  __device__ WgradGradLoader(const WgradParams<T>& p, int64_t m0, int64_t grp, int64_t end)
      : p_(p),
        end_(end),
        valid_(m0 + static_cast<int>(threadIdx.x) % kVecsPerRow * kVec < p.g.k_per_group()),
        k_(grp * p.g.k_per_group() + m0 + static_cast<int>(threadIdx.x) % kVecsPerRow * kVec),
        col_(static_cast<int>(threadIdx.x) % kVecsPerRow * kVec),
        row_(static_cast<int>(threadIdx.x) / kVecsPerRow) {}

  __device__ void gather(int64_t i0) {
    regs_.clear();
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int64_t i = i0 + row_ + pass * kRowsPerPass;
      if (valid_ && i < end_) regs_.load(pass, p_.dy, i * p_.g.K + k_);
    }
  }

  __device__ void stage(T* a_tile) const {
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      regs_.stage(pass, p_.dy, p_.g.K, k_,
                  a_tile + (row_ + pass * kRowsPerPass) * kPitchA<T, true> + col_);
    }
  }

 private:
  const WgradParams<T>& p_;
  const int64_t end_;  // end of this block's split of the rows
  const bool valid_;   // this thread's output channels are inside the group
  const int64_t k_;    // first output channel of this thread's columns
  const int col_, row_;
  GradRegisters<T, kVec, kPasses, kCoef, kRoundToTf32> regs_;
};

// B[i][j] = the conv input element output pixel i reads through Kd column j = (r, s, c), after
// the BN+ReLU prologue; padding taps stay 0. kVec consecutive columns share a tap (Cg % kVec == 0).
template <typename T, int kVec, bool kBnRelu, bool kRoundToTf32>
class WgradInputLoader {
 public:
  static constexpr int kVecsPerRow = kBlockN / kVec;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
  static constexpr int kPasses = kBlockK / kRowsPerPass;
  static_assert(kBlockK % kRowsPerPass == 0, "tile shape");
  static_assert(kPasses <= 32, "one loaded bit per pass");

  __device__ WgradInputLoader(const WgradParams<T>& p, int64_t n0, int64_t grp, int64_t end)
      : p_(p),
        grp_(grp),
        end_(end),
        valid_(n0 + static_cast<int>(threadIdx.x) % kVecsPerRow * kVec < p.g.gemm_k()),
        tap_(valid_ ? tap_of_col(p.g, n0 + static_cast<int>(threadIdx.x) % kVecsPerRow * kVec)
                    : TapIndex{0, 0, 0}),
        col_(static_cast<int>(threadIdx.x) % kVecsPerRow * kVec),
        row_(static_cast<int>(threadIdx.x) / kVecsPerRow) {}

  __device__ void gather(int64_t i0) {
    const ConvGeometry& g = p_.g;
    loaded_ = 0;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int64_t i = i0 + row_ + pass * kRowsPerPass;
      b_[pass] = zeros<T, kVec>();
      if (valid_ && i < end_) {
        const int64_t offset = input_offset(g, pixel_of_row(g, i), tap_, grp_);
        if (offset >= 0) {
          b_[pass] = load_packed<T, kVec>(p_.x + offset);
          loaded_ |= 1u << pass;
        }
      }
    }
  }

  __device__ void stage(T* b_tile) const {
    const int64_t c = grp_ * p_.g.c_per_group() + tap_.c;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      Packed<T, kVec> v = b_[pass];
      if constexpr (kBnRelu) {
        if (loaded_ >> pass & 1u) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            v.v[e] = from_float<T>(
                bn_relu(to_float(v.v[e]), __ldg(p_.scale_in + c + e), __ldg(p_.shift_in + c + e)));
          }
        }
      }
      store_operand<kRoundToTf32>(b_tile + (row_ + pass * kRowsPerPass) * kPitchB<T> + col_, v);
    }
  }

 private:
  const WgradParams<T>& p_;
  const int64_t grp_;
  const int64_t end_;
  const bool valid_;    // this thread's Kd columns are inside the problem
  const TapIndex tap_;  // of this thread's first Kd column
  const int col_, row_;
  uint32_t loaded_;     // bit `pass`: b_[pass] was read from x (not padding or past the rows)
  Packed<T, kVec> b_[kPasses];
};

template <typename T, MathMode kMode, int kVec, bool kCoef, bool kBnRelu>
__global__ void __launch_bounds__(kThreads)
    wgrad_kernel(const __grid_constant__ WgradParams<T> p) {
  using Math = MathFor<T, kMode, true>;
  constexpr bool kRoundToTf32 = kMode == MathMode::kTensorCoreTf32;

  __shared__ __align__(128) unsigned char tile_storage[kTileBytes<T, true>];
  static_assert(sizeof(tile_storage) <= kMaxStaticSharedBytes, "static shared memory of wgrad_kernel");
  T* a_tile = reinterpret_cast<T*>(tile_storage);
  T* b_tile = reinterpret_cast<T*>(tile_storage + kABytes<T, true>);
  float* acc_tile = reinterpret_cast<float*>(tile_storage);

  const ConvGeometry& g = p.g;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const int64_t grp = blockIdx.z % g.groups;
  const int64_t split = blockIdx.z / g.groups;
  const int64_t begin = split * p.rows_per_split;
  const int64_t end =
      begin + p.rows_per_split < g.gemm_m() ? begin + p.rows_per_split : g.gemm_m();

  WgradGradLoader<T, kVec, kCoef, kRoundToTf32> a(p, m0, grp, end);
  WgradInputLoader<T, kVec, kBnRelu, kRoundToTf32> b(p, n0, grp, end);
  Math math;
  // The tf32 wgrad keeps more fragment registers live than the prefetch leaves room for (it
  // spills with it); it gathers each slice just before staging it instead.
  constexpr bool kPrefetch = kVec > 1 && kMode != MathMode::kTensorCoreTf32;
  gemm_main_loop<kPrefetch>(a, b, math, a_tile, b_tile, begin, end);
  math.store(acc_tile);
  __syncthreads();

  const int col = static_cast<int>(threadIdx.x) % kBlockN;
  const int lane = static_cast<int>(threadIdx.x) / kBlockN;
  const int64_t kd = n0 + col;
  if (kd >= g.gemm_k()) return;
  const int64_t rest = g.k_per_group() - m0;
  const int rows = static_cast<int>(rest < kBlockM ? rest : kBlockM);
  float* out = p.partials + (split * g.K + grp * g.k_per_group() + m0) * g.gemm_k() + kd;
  for (int row = lane; row < rows; row += kRowLanes) {
    out[row * g.gemm_k()] = acc_tile[row * kAccPitch + col];
  }
}

// Weight element e of the (K, Cg, R, S) output: the sum of its split partials, in split order.
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads)
    wgrad_finalize_kernel(const float* __restrict__ partials, T* __restrict__ grad_weight,
                          const ConvGeometry g, int64_t splits) {
  const int64_t numel = g.K * g.gemm_k();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += step) {
    const int64_t s = e % g.S;
    int64_t t = e / g.S;
    const int64_t r = t % g.R;
    t /= g.R;
    const int64_t c = t % g.c_per_group();
    const int64_t k = t / g.c_per_group();
    const float* src = partials + weight_offset(g, k, (r * g.S + s) * g.c_per_group() + c);
    float sum = 0.f;
    for (int64_t z = 0; z < splits; ++z) sum += src[z * numel];
    grad_weight[e] = from_float<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t dgrad_row_tiles(const ConvGeometry& g) { return ceil_div(g.N * g.H * g.W, kBlockM); }

struct WgradSplit {
  int64_t splits;
  int64_t rows_per_split;
};

WgradSplit wgrad_split(const ConvGeometry& g) {
  const int64_t tiles =
      ceil_div(g.k_per_group(), kBlockM) * ceil_div(g.gemm_k(), kBlockN) * g.groups;
  const int64_t slices = ceil_div(g.gemm_m(), kBlockK);
  if (slices == 0 || tiles == 0) return {1, 0};
  int64_t splits = std::min({ceil_div(kTargetBlocks, tiles), ceil_div(slices, kMinSlicesPerSplit),
                             kMaxSplits, std::max<int64_t>(1, 65535 / g.groups)});
  splits = std::max<int64_t>(splits, 1);
  const int64_t slices_per_split = ceil_div(slices, splits);
  // Recount, so that no split is empty.
  return {ceil_div(slices, slices_per_split), slices_per_split * kBlockK};
}

template <typename F>
int dispatch_bool(bool value, F&& f) {
  return value ? f(std::true_type{}) : f(std::false_type{});
}

template <MathMode kMode>
using ModeTag = std::integral_constant<MathMode, kMode>;

template <typename T, typename F>
int dispatch_math(bool allow_tf32, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    return allow_tf32 ? f(ModeTag<MathMode::kTensorCoreTf32>{})
                      : f(ModeTag<MathMode::kSimtFp32>{});
  } else {
    return f(ModeTag<MathMode::kTensorCore16>{});
  }
}

// 16-byte loads need whole vectors along both GEMMs' contiguous dims (Kper and Cg, which also
// makes every element offset a multiple of the width) and aligned base pointers.
template <typename T>
bool use_wide(const ConvGeometry& g, const ConvBnBackwardArgs& args, const void* other) {
  constexpr int kWide = kWideVec<T>;
  return g.k_per_group() % kWide == 0 && g.c_per_group() % kWide == 0 &&
         is_aligned(args.grad, 16) && (args.grad_coef == nullptr || is_aligned(args.grad_y, 16)) &&
         is_aligned(other, 16);
}

template <typename T>
int launch_dgrad(const ConvBnBackwardArgs& args, float* sums_workspace, cudaStream_t stream) {
  const ConvGeometry& g = args.geom;
  const bool with_sums = args.sum_g != nullptr;
  const int64_t tiles = dgrad_row_tiles(g);
  DgradParams<T> p{};
  p.g = g;
  p.dy = {static_cast<const T*>(args.grad), static_cast<const T*>(args.grad_y), args.grad_coef};
  p.weight = static_cast<const T*>(args.weight);
  p.x = static_cast<const T*>(args.x);
  p.scale_in = args.scale_in;
  p.shift_in = args.shift_in;
  p.mean_in = args.mean_in;
  p.invstd_in = args.invstd_in;
  p.grad_input = static_cast<T*>(args.grad_input);
  p.partial_sum_g = with_sums ? sums_workspace : nullptr;
  p.partial_sum_g_xhat = with_sums ? sums_workspace + tiles * g.C : nullptr;

  if (tiles > 0) {
    const int64_t blocks_n = ceil_div(g.c_per_group(), kBlockN);
    if (tiles > INT32_MAX || blocks_n > 65535 || g.groups > 65535) {
      return cudaErrorInvalidConfiguration;
    }
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(blocks_n),
                    static_cast<unsigned>(g.groups));
    const bool wide = use_wide<T>(g, args, args.weight);
    const int status = dispatch_math<T>(args.allow_tf32, [&](auto mode) {
      return dispatch_bool(args.grad_coef != nullptr, [&](auto coef) {
        constexpr MathMode kMode = decltype(mode)::value;
        constexpr bool kCoef = decltype(coef)::value;
        if (wide) {
          FUSEDRES_LAUNCH(grid, kThreads, 0, stream, dgrad_kernel<T, kMode, kWideVec<T>, kCoef>)(p);
        } else {
          FUSEDRES_LAUNCH(grid, kThreads, 0, stream, dgrad_kernel<T, kMode, 1, kCoef>)(p);
        }
        return static_cast<int>(cudaGetLastError());
      });
    });
    if (status != cudaSuccess) return status;
  }
  if (!with_sums) return cudaSuccess;
  const int64_t merge_blocks = ceil_div(g.C, kMergeChannels);
  if (merge_blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  FUSEDRES_LAUNCH(static_cast<unsigned>(merge_blocks), dim3(kMergeChannels, kMergeLanes), 0,
                  stream, merge_sums_kernel)(p.partial_sum_g, p.partial_sum_g_xhat, args.sum_g,
                                             args.sum_g_xhat, g.C, tiles);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_wgrad(const ConvBnBackwardArgs& args, float* partials, cudaStream_t stream) {
  const ConvGeometry& g = args.geom;
  const WgradSplit split = wgrad_split(g);
  WgradParams<T> p{};
  p.g = g;
  p.dy = {static_cast<const T*>(args.grad), static_cast<const T*>(args.grad_y), args.grad_coef};
  p.x = static_cast<const T*>(args.x);
  p.scale_in = args.scale_in;
  p.shift_in = args.shift_in;
  p.partials = partials;
  p.rows_per_split = split.rows_per_split;

  const int64_t blocks_m = ceil_div(g.k_per_group(), kBlockM);
  const int64_t blocks_n = ceil_div(g.gemm_k(), kBlockN);
  if (blocks_m > INT32_MAX || blocks_n > 65535 || g.groups * split.splits > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(blocks_n),
                  static_cast<unsigned>(g.groups * split.splits));
  const bool wide = use_wide<T>(g, args, args.x);
  const int status = dispatch_math<T>(args.allow_tf32, [&](auto mode) {
    return dispatch_bool(args.grad_coef != nullptr, [&](auto coef) {
      return dispatch_bool(args.scale_in != nullptr, [&](auto bn_relu) {
        constexpr MathMode kMode = decltype(mode)::value;
        constexpr bool kCoef = decltype(coef)::value;
        constexpr bool kBnRelu = decltype(bn_relu)::value;
        if (wide) {
          FUSEDRES_LAUNCH(grid, kThreads, 0, stream,
                          wgrad_kernel<T, kMode, kWideVec<T>, kCoef, kBnRelu>)(p);
        } else {
          FUSEDRES_LAUNCH(grid, kThreads, 0, stream, wgrad_kernel<T, kMode, 1, kCoef, kBnRelu>)(p);
        }
        return static_cast<int>(cudaGetLastError());
      });
    });
  });
  if (status != cudaSuccess) return status;
  FUSEDRES_LAUNCH(elementwise_blocks(g.K * g.gemm_k()), kElementwiseThreads, 0, stream,
                  wgrad_finalize_kernel<T>)(partials, static_cast<T*>(args.grad_weight), g,
                                            split.splits);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t conv_bn_backward_workspace_floats(const ConvGeometry& geom, bool with_sums,
                                          bool need_weight) {
  int64_t floats = 0;
  if (with_sums) floats += 2 * dgrad_row_tiles(geom) * geom.C;
  if (need_weight && geom.K * geom.gemm_k() > 0) {
    floats += wgrad_split(geom).splits * geom.K * geom.gemm_k();
  }
  return floats;
}

int launch_conv_bn_backward(const ConvBnBackwardArgs& args, cudaStream_t stream) {
  const ConvGeometry& g = args.geom;
  if (g.groups <= 0 || g.C % g.groups != 0 || g.K % g.groups != 0 || g.stride_h <= 0 ||
      g.stride_w <= 0) {
    return cudaErrorInvalidValue;
  }
  const bool with_sums = args.sum_g != nullptr;
  const bool need_input = args.grad_input != nullptr || with_sums;
  const bool need_weight = args.grad_weight != nullptr && g.K * g.gemm_k() > 0;
  // Empty tensors may have null data pointers: a pointer is required only where it is read.
  const bool has_input = g.N * g.H * g.W * g.C > 0;
  const bool dgrad_reads_grad = need_input && has_input && g.R * g.S * g.k_per_group() > 0;
  const bool wgrad_reads = need_weight && g.gemm_m() > 0;
  const bool grad_ok =
      args.grad != nullptr && (args.grad_coef == nullptr || args.grad_y != nullptr);
  if ((args.scale_in == nullptr) != (args.shift_in == nullptr) ||
      (with_sums && (args.scale_in == nullptr || args.mean_in == nullptr ||
                     args.invstd_in == nullptr || args.sum_g_xhat == nullptr)) ||
      (need_input && has_input &&
       (args.grad_input == nullptr || (with_sums && args.x == nullptr))) ||
      (dgrad_reads_grad && (!grad_ok || args.weight == nullptr)) ||
      (wgrad_reads && (!grad_ok || args.x == nullptr)) ||
      (conv_bn_backward_workspace_floats(g, with_sums, need_weight) > 0 &&
       args.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  float* sums_workspace = args.workspace;
  float* wgrad_workspace =
      args.workspace == nullptr
          ? nullptr
          : args.workspace + (with_sums ? 2 * dgrad_row_tiles(g) * g.C : 0);
  return dispatch_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (need_input && g.C > 0) {
      const int status = launch_dgrad<T>(args, sums_workspace, stream);
      if (status != cudaSuccess) return status;
    }
    if (need_weight) return launch_wgrad<T>(args, wgrad_workspace, stream);
    return static_cast<int>(cudaSuccess);
  });
}

}  // namespace fusedres::cuda
