// The block tile of the implicit-GEMM conv kernels and the math that multiplies it (.cu only),
// shared by the forward (csrc/conv_bn_act/implicit_gemm.cuh) and the backward convs
// (csrc/conv_bn_backward/conv_bn_backward_cuda.cu).
//
// A block of kThreads = 128 threads (4 warps, 2 x 2) owns a kBlockM x kBlockN = 128 x 64 output
// tile and walks the reduction in kBlockK = 32 wide slices. Each slice's operands sit in shared
// memory: A is kBlockM x kBlockK, B is kBlockK x kBlockN, each stored in whichever orientation
// its global memory is contiguous in (TileLayout), so 16-byte loads land unshuffled. Math modes:
// fp16/bf16 WMMA m16n16k16 and tf32 WMMA m16n16k8 with fp32 accumulators (a warp owns 64 x 32,
// 4 x 2 fragments), or exact fp32 fmaf on the CUDA cores. store() writes the fp32 result to a
// kBlockM x kAccPitch tile in shared memory for the epilogue.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

namespace fusedres::cuda::tile_math {

namespace wmma = nvcuda::wmma;

constexpr int kBlockM = 128;
constexpr int kBlockN = 64;
constexpr int kBlockK = 32;
constexpr int kThreads = 128;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 2;
static_assert(kWarpsM * kWarpsN * 32 == kThreads, "one warp per warp tile");

// Row pitch of the fp32 accumulator tile the epilogue reads.
constexpr int kAccPitch = kBlockN + 4;
constexpr int kAccBytes = kBlockM * kAccPitch * static_cast<int>(sizeof(float));

// 16 bytes of padding per stored row staggers rows across banks and keeps every 16-row
// fragment start 32-byte aligned, as wmma::load_matrix_sync requires.
template <typename T>
constexpr int kRowPad = 16 / static_cast<int>(sizeof(T));

// How an operand tile is stored: element (i, kk), i its row of A or column of B and kk its
// position in the slice, at offset(i, kk). kReductionContiguous: stored [i][kk] (a row holds a
// slice of the reduction), else [kk][i]. kPitch elements per stored row.
template <int kPitch, bool kReductionContiguous>
struct TileLayout {
  static constexpr int pitch = kPitch;
  static constexpr bool reduction_contiguous = kReductionContiguous;
  __device__ static constexpr int offset(int i, int kk) {
    return kReductionContiguous ? i * kPitch + kk : kk * kPitch + i;
  }
};

// The layout of a kExtent x kBlockK operand (kExtent = kBlockM for A, kBlockN for B) of T, and
// the bytes it takes.
template <typename T, int kExtent, bool kReductionContiguous>
using OperandLayout =
    TileLayout<(kReductionContiguous ? kBlockK : kExtent) + kRowPad<T>, kReductionContiguous>;
template <typename T, int kExtent, typename Layout>
constexpr int kOperandBytes =
    (Layout::reduction_contiguous ? kExtent : kBlockK) * Layout::pitch * static_cast<int>(sizeof(T));

enum class MathMode { kTensorCore16, kTensorCoreTf32, kSimtFp32 };

// Tensor-core math on WMMA fragments: 16-bit operands with k = 16, or tf32 with k = 8.
template <typename T, typename FragElem, int kMmaK, typename LayoutA, typename LayoutB>
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
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kMmaK) {
      FragA a[kFragsM];
      FragB b[kFragsN];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        wmma::load_matrix_sync(a[i], a_tile + LayoutA::offset(row0() + i * 16, kk), LayoutA::pitch);
      }
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        wmma::load_matrix_sync(b[j], b_tile + LayoutB::offset(col0() + j * 16, kk), LayoutB::pitch);
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
  // matrix_a is M x K: [i][kk] storage is its row-major form. matrix_b is K x N: [i][kk]
  // storage (i = column) is its column-major form.
  using FragLayoutA = std::conditional_t<LayoutA::reduction_contiguous, wmma::row_major, wmma::col_major>;
  using FragLayoutB = std::conditional_t<LayoutB::reduction_contiguous, wmma::col_major, wmma::row_major>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kMmaK, FragElem, FragLayoutA>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, kMmaK, FragElem, FragLayoutB>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, kMmaK, float>;

  __device__ int row0() const { return warp_m_ * (kBlockM / kWarpsM); }
  __device__ int col0() const { return warp_n_ * (kBlockN / kWarpsN); }

  const int warp_m_, warp_n_;
  FragC acc_[kFragsM][kFragsN];
};

// Exact fp32 on the CUDA cores. Thread (ty, tx) of a 16 x 8 grid owns rows ty + 16 i and
// columns tx + 8 j: a warp reads 4 A values and 8 B values per step, in distinct banks or
// broadcast, in either layout.
template <typename LayoutA, typename LayoutB>
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
#pragma unroll 8
    for (int kk = 0; kk < kBlockK; ++kk) {
      float a[kRows];
      float b[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) a[i] = a_tile[LayoutA::offset(ty_ + i * kThreadsM, kk)];
#pragma unroll
      for (int j = 0; j < kCols; ++j) b[j] = b_tile[LayoutB::offset(tx_ + j * kThreadsN, kk)];
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

// The math of a mode; the operand tiles hold the storage dtype in every mode (tf32 lives in
// fp32 storage, rounded when staged).
template <typename T, MathMode kMode, typename LayoutA, typename LayoutB>
struct MathOf;
template <typename T, typename LayoutA, typename LayoutB>
struct MathOf<T, MathMode::kTensorCore16, LayoutA, LayoutB> {
  using type = WmmaMath<T, T, 16, LayoutA, LayoutB>;
};
template <typename LayoutA, typename LayoutB>
struct MathOf<float, MathMode::kTensorCoreTf32, LayoutA, LayoutB> {
  using type = WmmaMath<float, wmma::precision::tf32, 8, LayoutA, LayoutB>;
};
template <typename LayoutA, typename LayoutB>
struct MathOf<float, MathMode::kSimtFp32, LayoutA, LayoutB> {
  using type = SimtMath<LayoutA, LayoutB>;
};

}  // namespace fusedres::cuda::tile_math
