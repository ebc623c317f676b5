// Prints implicit-GEMM offsets from conv_geometry.h (the helpers the CUDA kernels use) for the
// geometry given on the command line; tests/test_index_math.py checks them with Python's
// unbounded integers, including shapes far past 2^31 elements that are never allocated.
#include <cstdio>
#include <cstdlib>

#include "fusedres/conv_geometry.h"

int main(int argc, char** argv) {
  if (argc != 18) {
    std::fprintf(stderr, "usage: N H W C K R S stride_h stride_w pad_h pad_w dil_h dil_w groups m kd k\n");
    return 2;
  }
  long long v[17];
  for (int i = 0; i < 17; ++i) v[i] = std::atoll(argv[i + 1]);
  fusedres::ConvGeometry g{};
  g.N = v[0]; g.H = v[1]; g.W = v[2]; g.C = v[3]; g.K = v[4]; g.R = v[5]; g.S = v[6];
  g.stride_h = v[7]; g.stride_w = v[8]; g.pad_h = v[9]; g.pad_w = v[10];
  g.dil_h = v[11]; g.dil_w = v[12]; g.groups = v[13];
  g.P = fusedres::conv_out_size(g.H, g.R, g.stride_h, g.pad_h, g.dil_h);
  g.Q = fusedres::conv_out_size(g.W, g.S, g.stride_w, g.pad_w, g.dil_w);
  const long long m = v[14], kd = v[15], k = v[16];
  const auto px = fusedres::pixel_of_row(g, m);
  const auto tap = fusedres::tap_of_col(g, kd);
  const long long grp = k / g.k_per_group();
  std::printf("%lld %lld %lld %lld %lld %lld %lld %lld %lld\n", (long long)g.gemm_m(), (long long)px.n,
              (long long)px.p, (long long)px.q, (long long)tap.r, (long long)tap.s, (long long)tap.c,
              (long long)fusedres::input_offset(g, px, tap, grp),
              (long long)fusedres::weight_offset(g, k, kd));
  return 0;
}
