// The per-block transforms of winograd.cpp. No include guard, on purpose: winograd.cpp includes
// this file once per instruction set, each time inside its own namespace and under its own
// `#pragma GCC target`, so every helper below is compiled (and inlined) once per target and no
// two targets share a symbol. Needs kTile, kEntries and Geometry from the includer.

// 16 floats as a GCC vector: each target lowers it to its own registers (one zmm, two ymm, four
// xmm). `unaligned_vec` reads and writes it at any float address.
typedef float vec __attribute__((vector_size(64)));
typedef float unaligned_vec __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kLanes = 16;

#define FUSEDRES_INLINE inline __attribute__((always_inline))

// Vectors go by reference, never by value: passing a 64-byte vector by value has a different ABI
// with and without AVX512 (GCC warns, -Wpsabi), and these always inline anyway.
template <typename V>
FUSEDRES_INLINE void load(V& v, const float* p) {
  if constexpr (std::is_same_v<V, float>) {
    v = *p;
  } else {
    v = *reinterpret_cast<const unaligned_vec*>(p);
  }
}

template <typename V>
FUSEDRES_INLINE void store(float* p, const V& v) {
  if constexpr (std::is_same_v<V, float>) {
    *p = v;
  } else {
    *reinterpret_cast<unaligned_vec*>(p) = v;
  }
}

// v = max(v, 0), keeping NaN as torch.relu does.
template <typename V>
FUSEDRES_INLINE void relu(V& v) {
  if constexpr (std::is_same_v<V, float>) {
    v = v < 0.f ? 0.f : v;
  } else {
    v = v < 0.f ? vec{} : v;
  }
}

// V = B^T d B for channels [c, c + lanes) of one tile; d[r * 4 + s] points at input row r,
// column s of the patch (a row of zeros where it falls in the padding). Entry e goes to
// out[e * ld + c].
template <typename V>
FUSEDRES_INLINE void input_tile(const float* const* d, int64_t c, float* out, int64_t ld) {
  V t[kEntries];
  for (int64_t s = 0; s < kTile; ++s) {
    V d0, d1, d2, d3;
    load(d0, d[0 * kTile + s] + c);
    load(d1, d[1 * kTile + s] + c);
    load(d2, d[2 * kTile + s] + c);
    load(d3, d[3 * kTile + s] + c);
    t[0 * kTile + s] = d0 - d2;
    t[1 * kTile + s] = d1 + d2;
    t[2 * kTile + s] = d2 - d1;
    t[3 * kTile + s] = d1 - d3;
  }
  for (int64_t r = 0; r < kTile; ++r) {
    const V* row = t + r * kTile;
    store<V>(out + (r * kTile + 0) * ld + c, V(row[0] - row[2]));
    store<V>(out + (r * kTile + 1) * ld + c, V(row[1] + row[2]));
    store<V>(out + (r * kTile + 2) * ld + c, V(row[2] - row[1]));
    store<V>(out + (r * kTile + 3) * ld + c, V(row[1] - row[3]));
  }
}

// Y = A^T m A for channels [k, k + lanes) of one tile (entry e at m[e * ld + k]), plus bias,
// residual and ReLU; output pixel j (row j / 2, column j % 2 of the tile) goes to out[j] + k,
// reading its residual at res[j] + k.
template <bool kResidual, bool kRelu, typename V>
FUSEDRES_INLINE void output_tile(const float* m, int64_t ld, int64_t k, const float* bias,
                                 float* const* out, const float* const* res) {
  V s0[kTile], s1[kTile];
  for (int64_t c = 0; c < kTile; ++c) {
    V m0, m1, m2, m3;
    load(m0, m + (0 * kTile + c) * ld + k);
    load(m1, m + (1 * kTile + c) * ld + k);
    load(m2, m + (2 * kTile + c) * ld + k);
    load(m3, m + (3 * kTile + c) * ld + k);
    s0[c] = m0 + m1 + m2;
    s1[c] = m1 - m2 - m3;
  }
  V b;
  load(b, bias + k);
  const V y[4] = {s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3], s1[0] + s1[1] + s1[2],
                  s1[1] - s1[2] - s1[3]};
  for (int j = 0; j < 4; ++j) {
    V v = y[j] + b;
    if constexpr (kResidual) {
      V r;
      load(r, res[j] + k);
      v += r;
    }
    if constexpr (kRelu) relu(v);
    store(out[j] + k, v);
  }
}

FUSEDRES_INLINE void tile_coords(const Geometry& g, int64_t t, int64_t& n, int64_t& th,
                                 int64_t& tw) {
  tw = t % g.tiles_w;
  th = t / g.tiles_w % g.tiles_h;
  n = t / g.tiles_w / g.tiles_h;
}

// V[e][i][c] (at V + e * ld + i * C + c) for the T tiles from t0 (e: the 16 transformed
// entries, i: the tile in the block).
inline void input_block(const Geometry& g, const float* x, const float* zeros, int64_t t0,
                        int64_t T, float* V, int64_t ld) {
  for (int64_t i = 0; i < T; ++i) {
    int64_t n, th, tw;
    tile_coords(g, t0 + i, n, th, tw);
    const float* d[kEntries];
    for (int64_t r = 0; r < kTile; ++r) {
      const int64_t y = 2 * th - 1 + r;
      for (int64_t s = 0; s < kTile; ++s) {
        const int64_t x_col = 2 * tw - 1 + s;
        const bool inside = y >= 0 && y < g.H && x_col >= 0 && x_col < g.W;
        d[r * kTile + s] = inside ? x + ((n * g.H + y) * g.W + x_col) * g.C : zeros;
      }
    }
    float* out = V + i * g.C;
    int64_t c = 0;
    for (; c + kLanes <= g.C; c += kLanes) input_tile<vec>(d, c, out, ld);
    for (; c < g.C; ++c) input_tile<float>(d, c, out, ld);
  }
}

// The output pixels of tiles [t0, t0 + T), channels [k0, k0 + KB), from M[e][i][k - k0] (at
// M + e * ld + i * KB + k - k0). Pixels past the bottom or right edge (odd H or W) read zeros and
// are written to `discard`.
template <bool kResidual, bool kRelu>
void output_block(const Geometry& g, const float* M, int64_t ld, int64_t t0, int64_t T,
                  int64_t k0, int64_t KB, const float* bias, const float* residual,
                  const float* zeros, float* discard, float* y) {
  for (int64_t i = 0; i < T; ++i) {
    int64_t n, th, tw;
    tile_coords(g, t0 + i, n, th, tw);
    float* out[4];
    const float* res[4];
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t py = 2 * th + j / 2, px = 2 * tw + j % 2;
      const int64_t offset = ((n * g.H + py) * g.W + px) * g.K + k0;
      const bool inside = py < g.H && px < g.W;
      out[j] = inside ? y + offset : discard;
      res[j] = inside && kResidual ? residual + offset : zeros;
    }
    const float* m = M + i * KB;
    int64_t k = 0;
    for (; k + kLanes <= KB; k += kLanes) {
      output_tile<kResidual, kRelu, vec>(m, ld, k, bias + k0, out, res);
    }
    for (; k < KB; ++k) output_tile<kResidual, kRelu, float>(m, ld, k, bias + k0, out, res);
  }
}

inline void output_block_any(bool residual_given, bool relu, const Geometry& g, const float* M,
                             int64_t ld, int64_t t0, int64_t T, int64_t k0, int64_t KB,
                             const float* bias, const float* residual, const float* zeros,
                             float* discard, float* y) {
  auto run = residual_given ? (relu ? output_block<true, true> : output_block<true, false>)
                            : (relu ? output_block<false, true> : output_block<false, false>);
  run(g, M, ld, t0, T, k0, KB, bias, residual, zeros, discard, y);
}

#undef FUSEDRES_INLINE
