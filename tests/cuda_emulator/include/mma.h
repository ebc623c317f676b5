// nvcuda::wmma for the CPU emulator: whole-tile fragments with the hardware's alignment rules.
//
// Every lane holds a whole tile. load_matrix_sync and fill_fragment fill all of it; mma_sync and
// store_matrix_sync work on the lane's 1/32 share of the accumulator elements only, so the warp
// does the hardware's work once between its lanes, and a lane that skips a collective leaves its
// share unwritten (NaN-poisoned memory shows it). Each collective is logged per lane with its
// pointer and ldm; the runtime fails a warp whose lanes disagree (divergence, non-uniform args).
// tf32: mma_sync reads only the 19 tf32 bits of each operand, as the tensor cores do, and
// __float_to_tf32 rounds to nearest, ties away from zero (cvt.rna.tf32.f32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float to_f32(float v) { return v; }
inline float to_f32(__half v) { return __half2float(v); }
inline float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// The bits of a tf32 operand the tensor cores read: sign, exponent and the top 10 mantissa bits.
inline float tf32_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

enum Op : uint64_t { kLoad = 1, kStore = 2, kMma = 3, kFill = 4 };

inline void record(Op op, const void* p, unsigned ldm, int layout) {
  ::fusedres_emu::record_warp_op(
      (static_cast<uint64_t>(op) << 60) ^ reinterpret_cast<uintptr_t>(p) ^
      (static_cast<uint64_t>(ldm) << 40) ^ (static_cast<uint64_t>(layout) << 58));
}

// Hardware rules of wmma::load_matrix_sync / store_matrix_sync: a 256-bit aligned pointer and
// an ldm that is a multiple of 16 bytes; the tile must lie inside shared memory when it starts
// there.
template <typename E>
void check_access(const E* p, unsigned ldm, int rows, int cols, bool row_major_mem,
                  const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    ::fusedres_emu::fail(what, "pointer is not 256-bit aligned", 0);
  }
  if ((ldm * sizeof(E)) % 16 != 0) {
    ::fusedres_emu::fail(what, "ldm is not a multiple of 16 bytes (8 16-bit or 4 32-bit elements)",
                         static_cast<int>(ldm));
  }
  const int outer = row_major_mem ? rows : cols;
  const int inner = row_major_mem ? cols : rows;
  if (static_cast<int>(ldm) < inner) {
    ::fusedres_emu::fail(what, "ldm is smaller than the stored extent of a row/column",
                         static_cast<int>(ldm));
  }
  if (::fusedres_emu::in_shared(p) &&
      !::fusedres_emu::shared_range_ok(p, p + static_cast<size_t>(outer - 1) * ldm + inner)) {
    ::fusedres_emu::fail(what, "tile runs past the end of its shared variable", 0);
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using storage_type = typename detail::Storage<T>::type;
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  storage_type x[num_elements];  // row-major (row, col) of the tile
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  using E = typename fragment<Use, M, N, K, T, L>::storage_type;
  detail::record(detail::kFill, nullptr, 0, 0);
  for (auto& e : f.x) e = static_cast<E>(v);
}

// matrix_a / matrix_b, layout from the fragment type.
template <typename Use, int M, int N, int K, typename T, typename L, typename E>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const E* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  static_assert(std::is_same_v<E, typename F::storage_type>, "pointer type of the fragment");
  constexpr bool kRowMajor = std::is_same_v<L, row_major>;
  detail::check_access(p, ldm, F::rows, F::cols, kRowMajor, "wmma::load_matrix_sync");
  detail::record(detail::kLoad, p, ldm, kRowMajor);
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = kRowMajor ? p[static_cast<size_t>(r) * ldm + c]
                                       : p[static_cast<size_t>(c) * ldm + r];
    }
  }
}

template <int M, int N, int K, typename E>
void load_matrix_sync(fragment<accumulator, M, N, K, E, void>& f, const E* p, unsigned ldm,
                      layout_t layout) {
  using F = fragment<accumulator, M, N, K, E, void>;
  const bool row = layout == mem_row_major;
  detail::check_access(p, ldm, F::rows, F::cols, row, "wmma::load_matrix_sync");
  detail::record(detail::kLoad, p, ldm, 2 + row);
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] =
          row ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r];
    }
  }
}

template <int M, int N, int K, typename E>
void store_matrix_sync(E* p, const fragment<accumulator, M, N, K, E, void>& f, unsigned ldm,
                       layout_t layout) {
  using F = fragment<accumulator, M, N, K, E, void>;
  const bool row = layout == mem_row_major;
  detail::check_access(p, ldm, F::rows, F::cols, row, "wmma::store_matrix_sync");
  detail::record(detail::kStore, p, ldm, 2 + row);
  constexpr int kShare = F::num_elements / 32;
  const int lane = ::fusedres_emu::lane_id();
  for (int e = lane * kShare; e < (lane + 1) * kShare; ++e) {
    const int r = e / F::cols, c = e % F::cols;
    (row ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r]) = f.x[e];
  }
}

// d = a * b + c on the lane's share of the accumulator elements; products of tf32, fp16 or bf16
// operands are exact in fp32, accumulated in k order.
template <int M, int N, int K, typename T, typename LA, typename LB, typename Acc>
void mma_sync(fragment<accumulator, M, N, K, Acc, void>& d,
              const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, Acc, void>& c) {
  static_assert(std::is_same_v<Acc, float>, "fp32 accumulators only");
  constexpr bool kTf32 = std::is_same_v<T, precision::tf32>;
  detail::record(detail::kMma, nullptr, 0, 0);
  constexpr int kShare = M * N / 32;
  const int lane = ::fusedres_emu::lane_id();
  for (int e = lane * kShare; e < (lane + 1) * kShare; ++e) {
    const int i = e / N, j = e % N;
    float acc = c.x[e];
    for (int k = 0; k < K; ++k) {
      float av = detail::to_f32(a.x[i * K + k]);
      float bv = detail::to_f32(b.x[k * N + j]);
      if constexpr (kTf32) {
        av = detail::tf32_bits(av);
        bv = detail::tf32_bits(bv);
      }
      acc += av * bv;
    }
    d.x[e] = acc;
  }
}

// cvt.rna.tf32.f32: round the 13 dropped mantissa bits to nearest, ties away from zero; NaN
// stays NaN and infinities stay infinite.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    if (u & 0x007fffffu) u = 0x7fffffffu;
  } else {
    u = (u + 0x1000u) & 0xffffe000u;
  }
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace nvcuda::wmma
