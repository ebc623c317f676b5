// conv -> BatchNorm (folded to a per-channel affine) -> (+ residual) -> ReLU on CUDA, one launch:
// the implicit-GEMM conv of implicit_gemm.cuh with the input as stored and this epilogue.
//
// Epilogue: each thread owns one output channel of the 128 x 64 accumulator tile (scale/shift
// loaded once) and walks the rows, so a warp writes 32 consecutive channels of a pixel:
// act(acc*scale + shift + residual), rounded once to the output dtype. The residual is read at
// shortcut_pixel_offset from the main loop's decoded pixels (no division per row), so a strided,
// narrower residual (option A) costs no more than one of the output's shape.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "conv_bn_act/implicit_gemm.cuh"
#include "fusedres/conv_geometry.h"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launchers.h"
#include "fusedres/epilogue.h"

namespace fusedres::cuda {
namespace {

using namespace implicit_gemm;

// One thread per output channel of the tile (scale and shift read once), walking the rows: a
// warp reads one accumulator row without bank conflicts and writes 32 consecutive channels.
template <typename T, bool kRelu>
struct BnActEpilogue {
  const float* scale;  // K, or nullptr meaning 1
  const float* shift;  // K, or nullptr meaning 0
  const T* residual;   // NHWC as described by residual_geom, or nullptr
  ShortcutGeometry residual_geom;
  T* out;              // M x K
  static constexpr int kSharedBytes = 0;

  __device__ void operator()(const ConvGeometry& g, const OutputTile& tile) const {
    static_assert(kThreads % kBlockN == 0, "whole rows per pass");
    const int col = static_cast<int>(threadIdx.x) % kBlockN;
    const int64_t k_in_group = tile.n0 + col;
    if (k_in_group >= g.k_per_group()) return;
    const int64_t k = tile.grp * g.k_per_group() + k_in_group;
    const float s = scale != nullptr ? scale[k] : 1.f;
    const float b = shift != nullptr ? shift[k] : 0.f;
    // Channels past the residual's (option A's zero extension) add nothing.
    const T* res_channel = residual != nullptr && k < residual_geom.C ? residual + k : nullptr;
    const int64_t gemm_m = g.gemm_m();

    for (int row = static_cast<int>(threadIdx.x) / kBlockN; row < kBlockM;
         row += kThreads / kBlockN) {
      const int64_t m = tile.m0 + row;
      if (m >= gemm_m) break;
      const int64_t offset = m * g.K + k;
      const float res =
          res_channel != nullptr
              ? to_float(res_channel[shortcut_pixel_offset(residual_geom, tile.pixels[row])])
              : 0.f;
      out[offset] = from_float<T>(bn_act<kRelu>(tile.acc[row * kAccPitch + col], s, b, res));
    }
  }
};

template <typename T>
int launch_for_dtype(const ConvBnActArgs& args, cudaStream_t stream) {
  const auto* residual = static_cast<const T*>(args.residual);
  auto* out = static_cast<T*>(args.out);
  const ShortcutGeometry& rg = args.residual_geom;
  if (args.relu) {
    return launch<T>(args.geom, args.x, args.weight, args.allow_tf32, IdentityPrologue{},
                     BnActEpilogue<T, true>{args.scale, args.shift, residual, rg, out}, stream);
  }
  return launch<T>(args.geom, args.x, args.weight, args.allow_tf32, IdentityPrologue{},
                   BnActEpilogue<T, false>{args.scale, args.shift, residual, rg, out}, stream);
}

}  // namespace

int launch_conv_bn_act(const ConvBnActArgs& args, cudaStream_t stream) {
  const ConvGeometry& g = args.geom;
  if (g.groups <= 0 || g.C % g.groups != 0 || g.K % g.groups != 0) return cudaErrorInvalidValue;
  if (g.gemm_m() <= 0 || g.k_per_group() <= 0) return cudaSuccess;
  // With no reduction (C == 0) x and weight are empty and never read.
  const bool has_operands = args.x != nullptr && args.weight != nullptr;
  if (args.out == nullptr || (g.gemm_k() > 0 && !has_operands)) return cudaErrorInvalidValue;
  const ShortcutGeometry& rg = args.residual_geom;
  if (args.residual != nullptr &&
      (rg.stride <= 0 || rg.C > g.K || rg.P != g.P || rg.Q != g.Q ||
       (rg.H + rg.stride - 1) / rg.stride != g.P || (rg.W + rg.stride - 1) / rg.stride != g.Q)) {
    return cudaErrorInvalidValue;
  }

  return dispatch_dtype(args.dtype, [&](auto tag) {
    return launch_for_dtype<decltype(tag)>(args, stream);
  });
}

}  // namespace fusedres::cuda
