// Implicit-GEMM view of a 2-D convolution over NHWC tensors, shared by every kernel.
//
//   GEMM M  = N * P * Q   (one row per output pixel)
//   GEMM N  = K           (output channels; per group K / groups)
//   GEMM Kd = R * S * Cg  (filter taps times input channels per group, C fastest)
//
// All index math is int64 so tensors past 2^31 elements address correctly.
#pragma once

#include <cstdint>

#include "fusedres/macros.h"

namespace fusedres {

struct ConvGeometry {
  int64_t N, H, W, C;        // input, NHWC
  int64_t K, R, S;           // filter: K x R x S x (C / groups), KRSC
  int64_t P, Q;              // output spatial size
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dil_h, dil_w;
  int64_t groups;

  FUSEDRES_HD int64_t c_per_group() const { return C / groups; }
  FUSEDRES_HD int64_t k_per_group() const { return K / groups; }
  FUSEDRES_HD int64_t gemm_m() const { return N * P * Q; }
  FUSEDRES_HD int64_t gemm_k() const { return R * S * c_per_group(); }
};

FUSEDRES_HD int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                  int64_t dil) {
  return (in + 2 * pad - dil * (kernel - 1) - 1) / stride + 1;
}

// A flat index i of a row-major [outer][mid][inner] space -> (outer, mid, inner): the one
// decomposition behind every index below (pixels (n, p, q), reduction columns (r, s, c)).
struct Index3 {
  int64_t outer, mid, inner;
};
FUSEDRES_HD Index3 unflatten3(int64_t i, int64_t mid, int64_t inner) {
  const int64_t t = i / inner;
  return {t / mid, t % mid, i % inner};
}

// Output pixel m -> (n, p, q).
struct PixelIndex {
  int64_t n, p, q;
};
FUSEDRES_HD PixelIndex pixel_of_row(const ConvGeometry& g, int64_t m) {
  const Index3 i = unflatten3(m, g.P, g.Q);
  return {i.outer, i.mid, i.inner};
}

// Reduction index kd -> (r, s, c) within a group, C fastest (matches the KRSC weight layout).
struct TapIndex {
  int64_t r, s, c;
};
FUSEDRES_HD TapIndex tap_of_col(const ConvGeometry& g, int64_t kd) {
  const Index3 i = unflatten3(kd, g.S, g.c_per_group());
  return {i.outer, i.mid, i.inner};
}

// Offset of input element (pixel m, tap kd, group grp) in the NHWC input, or -1 when the tap
// falls in the zero padding.
FUSEDRES_HD int64_t input_offset(const ConvGeometry& g, const PixelIndex& px, const TapIndex& tap,
                                 int64_t grp) {
  const int64_t h = px.p * g.stride_h - g.pad_h + tap.r * g.dil_h;
  const int64_t w = px.q * g.stride_w - g.pad_w + tap.s * g.dil_w;
  if (h < 0 || h >= g.H || w < 0 || w >= g.W) return -1;
  return ((px.n * g.H + h) * g.W + w) * g.C + grp * g.c_per_group() + tap.c;
}

// Offset of weight element (output channel k, reduction index kd) in the KRSC weight.
FUSEDRES_HD int64_t weight_offset(const ConvGeometry& g, int64_t k, int64_t kd) {
  return k * g.gemm_k() + kd;
}

// The shortcut bn_add_act (and conv_bn_act's residual) adds to output element (row m = (n, p, q),
// channel k): shortcut[n, k, p * stride, q * stride] for k < C, and 0 for the channels past C.
// Stride 1 with C == K is the identity or projection shortcut; stride 2 with C < K is the
// paper's option A (subsample, then zero-extend the channels).
struct ShortcutGeometry {
  int64_t P, Q;     // output spatial size
  int64_t H, W, C;  // shortcut, NHWC
  int64_t stride;
};

// Offset of shortcut[n, 0, p * stride, q * stride] for output pixel (n, p, q); channel k < C
// adds k.
FUSEDRES_HD int64_t shortcut_pixel_offset(const ShortcutGeometry& s, const PixelIndex& px) {
  return ((px.n * s.H + px.p * s.stride) * s.W + px.q * s.stride) * s.C;
}

// The same for output row m, for kernels that have not decoded the row into a pixel.
FUSEDRES_HD int64_t shortcut_row_offset(const ShortcutGeometry& s, int64_t m) {
  const Index3 i = unflatten3(m, s.P, s.Q);
  return shortcut_pixel_offset(s, {i.outer, i.mid, i.inner});
}

}  // namespace fusedres
