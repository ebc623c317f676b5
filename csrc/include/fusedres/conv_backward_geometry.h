// Index math of a convolution's two backward GEMMs over NHWC tensors (conv_geometry.h has the
// forward's), shared by the CUDA kernels and the checks that replay it on the CPU.
//
//   dgrad  grad_input[M = N*H*W input pixels][Cg] = dy gathered[M][R*S*Kper] * W[R*S*Kper][Cg]
//          per group, reduction index j = (r, s, k) with k fastest (contiguous in dy).
//   wgrad  grad_weight[Kper][R*S*Cg] = dy^T[Kper][N*P*Q] * im2col(input)[N*P*Q][R*S*Cg]
//          per group; the columns are the forward's Kd = (r, s, c) (tap_of_col, input_offset).
#pragma once

#include <cstdint>

#include "fusedres/conv_geometry.h"
#include "fusedres/macros.h"

namespace fusedres {

// Input pixel m -> (n, h, w).
struct InputPixel {
  int64_t n, h, w;
};
FUSEDRES_HD InputPixel input_pixel_of_row(const ConvGeometry& g, int64_t m) {
  const Index3 i = unflatten3(m, g.H, g.W);
  return {i.outer, i.mid, i.inner};
}

// dgrad reduction index j -> (r, s, k within the group), k fastest.
struct DgradTap {
  int64_t r, s, k;
};
FUSEDRES_HD DgradTap dgrad_tap_of_col(const ConvGeometry& g, int64_t j) {
  const Index3 i = unflatten3(j, g.S, g.k_per_group());
  return {i.outer, i.mid, i.inner};
}

// The output pixel (row of dy) that input pixel px reaches through tap (r, s):
// h = p * stride - pad + r * dil, so p = (h + pad - r * dil) / stride when that divides exactly
// and lands in [0, P) (the same along w). -1 when no output pixel reads px through this tap.
FUSEDRES_HD int64_t dgrad_source_row(const ConvGeometry& g, const InputPixel& px, int64_t r,
                                     int64_t s) {
  const int64_t hp = px.h + g.pad_h - r * g.dil_h;
  const int64_t wp = px.w + g.pad_w - s * g.dil_w;
  if (hp < 0 || wp < 0 || hp % g.stride_h != 0 || wp % g.stride_w != 0) return -1;
  const int64_t p = hp / g.stride_h;
  const int64_t q = wp / g.stride_w;
  if (p >= g.P || q >= g.Q) return -1;
  return (px.n * g.P + p) * g.Q + q;
}

// Offset of weight element (output channel k, tap) in the weight's contiguous (K, Cg, R, S)
// layout, where grad_weight is returned.
FUSEDRES_HD int64_t weight_kcrs_offset(const ConvGeometry& g, int64_t k, const TapIndex& tap) {
  return ((k * g.c_per_group() + tap.c) * g.R + tap.r) * g.S + tap.s;
}

}  // namespace fusedres
