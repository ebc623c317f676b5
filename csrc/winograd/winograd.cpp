// winograd_conv_act on the CPU: act(conv3x3(x, W) + bias [+ residual]), stride 1, padding 1, in
// fp32 NHWC, as Winograd F(2x2, 3x3) (Lavin & Gray 2016): each 2x2 output tile is
//   Y = A^T [ sum_c U[., c, k] * V[., tile, c] ] A,   V = B^T d B (d: the tile's 4x4 input patch),
// with U = G W G^T prepacked by fusedres/ops/winograd.py (weight_t[4][4][K/64][C][64]). That
// turns a 3x3 conv's 9 multiply-adds per output into 16/4 = 4 (16 GEMMs of [tiles x C] x
// [C x K]), for the price of two add-only transforms. F(4x4, 3x3) would save more but its error
// is 9-28x a direct conv's; F(2x2, 3x3)'s stays below 1.6x (tests/test_winograd.py: 0.6x at
// ResNet's sizes, where each GEMM sums C products where the direct conv sums 9C).
//
// The tiles (over images and rows alike) are cut into blocks small enough that a block's
// transformed input V[16][T][C] and GEMM output M[16][T][K] stay in L2; one thread runs a block
// end to end: input transform, 16 GEMMs (ATen's cpublas::brgemm: oneDNN's JIT ukernel, BLAS
// elsewhere), output transform with bias, residual and ReLU written straight into the output.
// Where there are too few tiles to go around the threads, the output channels are split too.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>

#include "fusedres/aten_checks.h"

namespace fusedres {

namespace {

// Transformed tile side (m + r - 1) and its number of entries.
constexpr int64_t kTile = 4;
constexpr int64_t kEntries = kTile * kTile;
// The transformed weight's output channels come in panels of 64 (the last zero-padded), so that
// each GEMM reads a contiguous [C x 64] operand: from a row-major [C x K] one with K = 512 (rows
// 2 KiB apart) brgemm runs 20-35% slower at 16-64 tiles.
constexpr int64_t kPanel = 64;

struct Geometry {
  int64_t N, H, W, C, K;
  int64_t tiles_h, tiles_w, tiles;
  int64_t panels;  // of the weight's output channels
};

// How the work is cut: `tile_blocks` x `k_blocks` items of `block_tiles` tiles and `block_k`
// output channels each (the last of each ragged).
struct Blocking {
  int64_t block_tiles, tile_blocks, block_k, k_blocks;
};

// Floats between consecutive entries e of V[e][T][C] or M[e][T][block_k]: the matrix rounded
// up to 64 bytes, plus 64. Without the pad a block of 64 tiles x 64 channels puts the 16 entries
// 16 KiB apart, all in one L1 set, and the transforms (which touch all 16 at once) thrash it.
int64_t entry_stride(int64_t rows, int64_t cols) {
  return (rows * cols + 15) / 16 * 16 + 16;
}

// A thread's buffers: V[16][T][C], M[16][T][block_k], and zeros (C or K floats, whichever is
// more) for the patch entries in the padding and the residual of the output pixels past the edge,
// and a scratch row for those pixels' output. Kept between calls: no allocation in steady state.
struct Scratch {
  float* V;
  float* M;
  float* zeros;
  float* discard;
};

Scratch thread_scratch(const Geometry& g, const Blocking& b) {
  struct Buffer {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float, Buffer> buffer;
  thread_local int64_t capacity = 0;
  // Every part a multiple of 16 floats, so each starts 64-byte aligned.
  const int64_t v = kEntries * entry_stride(b.block_tiles, g.C);
  const int64_t m = kEntries * entry_stride(b.block_tiles, b.block_k);
  const int64_t z = (std::max(g.C, g.K) + 15) / 16 * 16;
  const int64_t total = v + m + 2 * z;
  if (total > capacity) {
    buffer.reset(static_cast<float*>(std::aligned_alloc(64, total * sizeof(float))));
    TORCH_CHECK(buffer != nullptr, "winograd_conv_act: out of memory for ", total,
                " floats of per-thread scratch");
    capacity = total;
  }
  float* base = buffer.get();
  std::fill(base + v + m, base + v + m + z, 0.f);
  return Scratch{base, base + v, base + v + m, base + v + m + z};
}

// The per-block transforms, compiled once per instruction set (the extension builds with plain
// -O3) from the same source and picked at run time.
struct Transforms {
  void (*input)(const Geometry&, const float*, const float*, int64_t, int64_t, float*, int64_t);
  void (*output)(bool, bool, const Geometry&, const float*, int64_t, int64_t, int64_t, int64_t,
                 int64_t, const float*, const float*, const float*, float*, float*);
};

namespace generic {
#include "winograd/winograd_tiles.h"
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDRES_WINOGRAD_X86 1
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f")
#include "winograd/winograd_tiles.h"
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "winograd/winograd_tiles.h"
#pragma GCC pop_options
}  // namespace avx2
#else
#define FUSEDRES_WINOGRAD_X86 0
#endif

// torch's own choice of instruction set (torch.backends.cpu.get_cpu_capability()), so that the
// environment variable ATEN_CPU_CAPABILITY=avx2 or =default selects the other variants here too.
const Transforms& transforms() {
  static const Transforms chosen = [] {
#if FUSEDRES_WINOGRAD_X86
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Transforms{avx512::input_block, avx512::output_block_any};
    if (capability == "AVX2") return Transforms{avx2::input_block, avx2::output_block_any};
#endif
    return Transforms{generic::input_block, generic::output_block_any};
  }();
  return chosen;
}

// Bytes of V and M a block may hold: about half of a Zen 4 / recent Xeon core's L2 (1-2 MB),
// the rest left to the weight's slice and the output rows.
constexpr int64_t kBlockBytes = 512 * 1024;
// Each block streams its weight slice U[16][C][block_k] once: below this many tiles per block
// that traffic outgrows the GEMM, however much of L2 the block's V and M spill out of (in a
// model the weights come from memory: at 256 channels, 14x14, batch 1, one block of 49 tiles
// instead of two halves the weight traffic). Fewer tiles than this per thread, and the threads
// split the output channels instead.
constexpr int64_t kMinBlockTiles = 64;
constexpr int64_t kMaxBlockTiles = 128;

Blocking choose_blocking(const Geometry& g, int64_t threads) {
  Blocking b{};
  b.block_k = g.K;
  if (threads > 1 && g.tiles < threads * kMinBlockTiles) {
    // Each thread takes a slice of the output channels (whole panels) over all the tiles.
    b.block_k = std::min(g.K, ((g.K + threads - 1) / threads + kPanel - 1) / kPanel * kPanel);
  }
  b.k_blocks = (g.K + b.block_k - 1) / b.block_k;
  const int64_t per_tile = kEntries * (g.C + b.block_k) * static_cast<int64_t>(sizeof(float));
  const int64_t fit = std::clamp<int64_t>(kBlockBytes / per_tile, kMinBlockTiles, kMaxBlockTiles);
  int64_t blocks = (g.tiles + fit - 1) / fit;
  // Whole rounds of blocks per thread, so that no thread waits on a last, lone block.
  if (b.k_blocks == 1) blocks = std::min(g.tiles, (blocks + threads - 1) / threads * threads);
  b.block_tiles = (g.tiles + blocks - 1) / blocks;
  b.tile_blocks = (g.tiles + b.block_tiles - 1) / b.block_tiles;
  return b;
}

void winograd_cpu(const Geometry& g, const float* x, const float* U, const float* bias,
                  const float* residual, bool relu, float* y) {
  const Blocking b = choose_blocking(g, at::get_num_threads());
  const Transforms& tf = transforms();
  at::parallel_for(0, b.tile_blocks * b.k_blocks, 1, [&](int64_t begin, int64_t end) {
    const Scratch s = thread_scratch(g, b);
    int64_t transformed = -1;  // the tile block now in s.V (items are tile-block major)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tb = item / b.k_blocks, kb = item % b.k_blocks;
      const int64_t t0 = tb * b.block_tiles, T = std::min(b.block_tiles, g.tiles - t0);
      const int64_t k0 = kb * b.block_k, KB = std::min(b.block_k, g.K - k0);
      const int64_t ld_v = entry_stride(T, g.C), ld_m = entry_stride(T, KB);
      if (tb != transformed) {
        tf.input(g, x, s.zeros, t0, T, s.V, ld_v);
        transformed = tb;
      }
      for (int64_t e = 0; e < kEntries; ++e) {
        for (int64_t p0 = k0; p0 < k0 + KB; p0 += kPanel) {
          const float* panel = U + (e * g.panels + p0 / kPanel) * g.C * kPanel;
          at::native::cpublas::brgemm(T, std::min(kPanel, k0 + KB - p0), g.C, g.C, kPanel, KB,
                                      /*add_C=*/false, s.V + e * ld_v, panel,
                                      s.M + e * ld_m + p0 - k0, /*is_vnni=*/false);
        }
      }
      tf.output(residual != nullptr, relu, g, s.M, ld_m, t0, T, k0, KB, bias, residual, s.zeros,
                s.discard, y);
    }
  });
}

bool dense_nhwc(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Checks the operands of both ops (named by `op`) and returns their geometry. The output
// channels K are the bias's.
Geometry check_operands(const char* op, const at::Tensor& x, const at::Tensor& weight_t,
                        const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(dense_nhwc(x), op, ": x must be channels_last (NHWC-contiguous); got strides ",
              x.strides(), " for shape ", x.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) > 0, op,
              ": bias must have shape (K,) (one value per output channel), got ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == at::kFloat, op, ": bias must be float32, got ",
              bias.scalar_type());
  check_same_device(op, "bias", bias, "x", x);
  const int64_t C = x.size(1), K = bias.size(0), panels = (K + kPanel - 1) / kPanel;
  TORCH_CHECK(C > 0, op, ": x must have at least one channel, got C=0");
  TORCH_CHECK(weight_t.dim() == 5 && weight_t.size(0) == kTile && weight_t.size(1) == kTile &&
                  weight_t.size(2) == panels && weight_t.size(4) == kPanel,
              op, ": weight_t must be the F(2x2, 3x3) transformed weight of shape (4, 4, ", panels,
              ", C, 64) for K=", K, " output channels (fusedres.ops.winograd.transform_weight ",
              "of a (K, C, 3, 3) weight), got ", weight_t.sizes());
  TORCH_CHECK(weight_t.size(3) == C, op, ": weight_t has ", weight_t.size(3),
              " input channels but x has ", C);
  TORCH_CHECK(weight_t.scalar_type() == at::kFloat, op, ": weight_t must be float32, got ",
              weight_t.scalar_type());
  TORCH_CHECK(weight_t.is_contiguous(), op, ": weight_t must be contiguous");
  check_same_device(op, "weight_t", weight_t, "x", x);
  Geometry g{x.size(0), x.size(2), x.size(3), C, K, 0, 0, 0, panels};
  g.tiles_h = (g.H + 1) / 2;
  g.tiles_w = (g.W + 1) / 2;
  g.tiles = g.N * g.tiles_h * g.tiles_w;
  return g;
}

void check_residual(const char* op, const char* name, const at::Tensor& res, const Geometry& g,
                    const at::Tensor& x) {
  TORCH_CHECK(res.dim() == 4 && res.size(0) == g.N && res.size(1) == g.K && res.size(2) == g.H &&
                  res.size(3) == g.W,
              op, ": ", name, " must have the output's shape (", g.N, ", ", g.K, ", ", g.H, ", ",
              g.W, "), got ", res.sizes());
  TORCH_CHECK(res.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              res.scalar_type());
  TORCH_CHECK(dense_nhwc(res), op, ": ", name,
              " must be channels_last (NHWC-contiguous); got strides ", res.strides(),
              " for shape ", res.sizes());
  check_same_device(op, name, res, "x", x);
}

at::Tensor winograd_conv_act_cpu(const at::Tensor& x, const at::Tensor& weight_t,
                                 const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                                 bool relu) {
  constexpr const char* op = "winograd_conv_act";
  const Geometry g = check_operands(op, x, weight_t, bias);
  if (residual.has_value()) check_residual(op, "residual", *residual, g, x);
  at::Tensor y = at::empty({g.N, g.K, g.H, g.W},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  winograd_cpu(g, x.const_data_ptr<float>(), weight_t.const_data_ptr<float>(),
               bias.const_data_ptr<float>(),
               residual.has_value() ? residual->const_data_ptr<float>() : nullptr, relu,
               y.mutable_data_ptr<float>());
  return y;
}

void winograd_conv_act_inplace_cpu(const at::Tensor& residual, const at::Tensor& x,
                                   const at::Tensor& weight_t, const at::Tensor& bias, bool relu) {
  constexpr const char* op = "winograd_conv_act_";
  const Geometry g = check_operands(op, x, weight_t, bias);
  check_residual(op, "residual", residual, g, x);
  // A tile reads its neighbours' input pixels: writing over x as it goes would corrupt them.
  TORCH_CHECK(at::get_overlap_status(residual, x) == at::MemOverlapStatus::No, op,
              ": residual (the output) must not share memory with x");
  if (residual.numel() == 0) return;
  float* out = residual.mutable_data_ptr<float>();
  winograd_cpu(g, x.const_data_ptr<float>(), weight_t.const_data_ptr<float>(),
               bias.const_data_ptr<float>(), out, relu, out);
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("winograd_conv_act", &fusedres::winograd_conv_act_cpu);
  m.impl("winograd_conv_act_", &fusedres::winograd_conv_act_inplace_cpu);
}
