// bn_add_act on CUDA: out = act(y * scale + shift + shortcut_term), one memory-bound pass.
//
// Each thread owns kVec consecutive channels of one output row at a time (grid-stride loop):
// 16-byte loads and stores when the channel counts and pointers allow, else one element. The
// shortcut is read at the same offset as y (identity/projection: same shape), or at
// shortcut_row_offset (option A: subsampled rows, zero-extended channels), where the row decode
// (two int64 divisions) is paid once per vector.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedres/batchnorm.h"
#include "fusedres/conv_geometry.h"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launch.h"
#include "fusedres/cuda_launchers.h"
#include "fusedres/cuda_vector.cuh"
#include "fusedres/epilogue.h"

namespace fusedres::cuda {
namespace {

enum class ShortcutKind { kNone, kSameLayout, kSubsampled };

template <typename T, int kVec, ShortcutKind kShortcut, bool kRelu>
__global__ void __launch_bounds__(kElementwiseThreads) bn_add_act_kernel(const BnAddActArgs args) {
  const int64_t K = args.channels;
  const int64_t vecs_per_row = K / kVec;
  const int64_t num_vecs = args.rows * vecs_per_row;
  const T* y = static_cast<const T*>(args.y);
  const T* shortcut = static_cast<const T*>(args.shortcut);
  T* out = static_cast<T*>(args.out);
  const ShortcutGeometry& sg = args.shortcut_geom;

  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x;
       v < num_vecs; v += static_cast<int64_t>(gridDim.x) * kElementwiseThreads) {
    const int64_t row = v / vecs_per_row;
    const int64_t k0 = (v - row * vecs_per_row) * kVec;
    const int64_t offset = row * K + k0;

    float term[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) term[i] = 0.f;
    if constexpr (kShortcut != ShortcutKind::kNone) {
      // With kVec > 1 the launcher guarantees C % kVec == 0: a vector is all in or all out.
      const bool in_shortcut = kShortcut == ShortcutKind::kSameLayout || k0 < sg.C;
      if (in_shortcut) {
        const int64_t sc_offset =
            kShortcut == ShortcutKind::kSameLayout ? offset : shortcut_row_offset(sg, row) + k0;
        const Packed<T, kVec> sc = load_packed<T, kVec>(shortcut + sc_offset);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const int64_t c = k0 + i;
          term[i] = shortcut_value(to_float(sc.v[i]),
                                   args.shortcut_scale != nullptr ? args.shortcut_scale[c] : 1.f,
                                   args.shortcut_shift != nullptr ? args.shortcut_shift[c] : 0.f);
        }
      }
    }

    const Packed<T, kVec> in = load_packed<T, kVec>(y + offset);
    Packed<T, kVec> result;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      result.v[i] = from_float<T>(
          bn_act<kRelu>(to_float(in.v[i]), args.scale[k0 + i], args.shift[k0 + i], term[i]));
    }
    store_packed(out + offset, result);
  }
}

template <typename T, int kVec, ShortcutKind kShortcut>
int launch_kernel(const BnAddActArgs& args, cudaStream_t stream) {
  const unsigned blocks = elementwise_blocks(args.rows * (args.channels / kVec));
  if (args.relu) {
    FUSEDRES_LAUNCH(blocks, kElementwiseThreads, 0, stream,
                    bn_add_act_kernel<T, kVec, kShortcut, true>)(args);
  } else {
    FUSEDRES_LAUNCH(blocks, kElementwiseThreads, 0, stream,
                    bn_add_act_kernel<T, kVec, kShortcut, false>)(args);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T, ShortcutKind kShortcut>
int launch_for_shortcut(const BnAddActArgs& args, cudaStream_t stream) {
  constexpr int kWide = kWideVec<T>;
  const bool shortcut_wide = kShortcut == ShortcutKind::kNone ||
                             (args.shortcut_geom.C % kWide == 0 && is_aligned(args.shortcut, 16));
  const bool wide = args.channels % kWide == 0 && is_aligned(args.y, 16) &&
                    is_aligned(args.out, 16) && shortcut_wide;
  return wide ? launch_kernel<T, kWide, kShortcut>(args, stream)
              : launch_kernel<T, 1, kShortcut>(args, stream);
}

template <typename T>
int launch_for_dtype(const BnAddActArgs& args, cudaStream_t stream) {
  if (args.shortcut == nullptr) return launch_for_shortcut<T, ShortcutKind::kNone>(args, stream);
  const ShortcutGeometry& sg = args.shortcut_geom;
  const bool same_layout = sg.stride == 1 && sg.C == args.channels && sg.H == sg.P && sg.W == sg.Q;
  return same_layout ? launch_for_shortcut<T, ShortcutKind::kSameLayout>(args, stream)
                     : launch_for_shortcut<T, ShortcutKind::kSubsampled>(args, stream);
}

}  // namespace

int launch_bn_add_act(const BnAddActArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.channels < 0) return cudaErrorInvalidValue;
  if (args.rows == 0 || args.channels == 0) return cudaSuccess;
  const ShortcutGeometry& sg = args.shortcut_geom;
  if (args.y == nullptr || args.out == nullptr || args.scale == nullptr ||
      args.shift == nullptr ||
      (args.shortcut != nullptr && (sg.stride <= 0 || sg.C > args.channels || sg.P <= 0 ||
                                    sg.Q <= 0 || args.rows % (sg.P * sg.Q) != 0))) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return launch_for_dtype<decltype(tag)>(args, stream);
  });
}

}  // namespace fusedres::cuda
