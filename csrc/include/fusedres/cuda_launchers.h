// Raw-pointer entry points of the CUDA kernels. The .cu files that define them include no
// torch header (compile time: ~2 s instead of ~2 min per file); the ATen glue in *_cuda_glue.cpp
// validates tensors and calls these on the current stream.
#pragma once

#include <cstdint>

#include "fusedres/conv_geometry.h"

// Same typedef as cuda_runtime_api.h, so callers need not include the CUDA headers.
typedef struct CUstream_st* cudaStream_t;

namespace fusedres::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConvBnActArgs {
  ConvGeometry geom;
  DType dtype;                 // of x, weight, residual and out
  const void* x;               // N x H x W x C (NHWC, dense)
  const void* weight;          // K x R x S x C/groups (KRSC, dense)
  const float* scale;          // K, fp32; nullptr means 1
  const float* shift;          // K, fp32; nullptr means 0
  const void* residual;        // NHWC as described by residual_geom, or nullptr for none
  ShortcutGeometry residual_geom;
  void* out;                   // N x P x Q x K (NHWC, dense)
  bool relu;
  bool allow_tf32;             // fp32 inputs may use TF32 tensor cores
};

// Returns a cudaError_t value (0 on success); the glue turns it into a TORCH_CHECK.
int launch_conv_bn_act(const ConvBnActArgs& args, cudaStream_t stream);

struct BnActBackwardArgs {
  int64_t rows;                // N * P * Q
  int64_t channels;            // K
  DType dtype;                 // of grad_out, out, grad_conv
  const void* grad_out;        // rows x K
  const void* out;             // rows x K, the forward output (for the ReLU mask)
  const float* scale;          // K, or nullptr meaning 1
  void* grad_conv;             // rows x K: act'(out) * grad_out * scale
  float* grad_shift;           // K: sum over rows of act'(out) * grad_out
  float* workspace;            // K * bn_act_backward_num_partials(rows) floats
  bool relu;
};

// Rows are split into this many slabs; each writes one partial sum per channel, and a second
// kernel adds the partials in a fixed order (deterministic, no float atomics).
int64_t bn_act_backward_num_partials(int64_t rows);
int launch_bn_act_backward(const BnActBackwardArgs& args, cudaStream_t stream);

// --- train mode (fusedres/ops/_ref.py has the math of each op) ---

struct ConvBnStatsArgs {
  ConvGeometry geom;
  DType dtype;                 // of x, weight and y
  const void* x;               // N x H x W x C (NHWC, dense)
  const void* weight;          // K x R x S x C/groups (KRSC, dense)
  const float* scale_in;       // C: prologue relu(x * scale_in + shift_in); nullptr (with
  const float* shift_in;       //    shift_in) means x is read as stored
  void* y;                     // N x P x Q x K (NHWC, dense)
  float* mean;                 // K: mean of y as stored
  float* m2;                   // K: sum((y - mean)^2) of y as stored
  float* workspace;            // 2 * K * conv_bn_stats_num_partials(geom) floats
  bool allow_tf32;             // fp32 inputs may use TF32 tensor cores
};

// One (mean, m2) partial per channel per 128-row output tile; a second kernel merges them with
// Chan's formula in a fixed order (deterministic, no float atomics).
int64_t conv_bn_stats_num_partials(const ConvGeometry& geom);
int launch_conv_bn_stats(const ConvBnStatsArgs& args, cudaStream_t stream);

struct BnFinalizeArgs {
  int64_t channels;            // K
  int64_t count;               // values per channel the statistics describe
  const float* mean;           // K
  const float* m2;             // K
  const float* weight;         // K, or nullptr meaning 1
  const float* bias;           // K, or nullptr meaning 0
  void* running_mean;          // K, updated in place; nullptr (with running_var) means untracked
  void* running_var;           // K, updated in place
  DType running_dtype;         // of running_mean and running_var
  float momentum;
  float eps;
  float* scale;                // K
  float* shift;                // K
  float* invstd;               // K
};

int launch_bn_finalize(const BnFinalizeArgs& args, cudaStream_t stream);

struct BnAddActArgs {
  int64_t rows;                // N * P * Q
  int64_t channels;            // K
  DType dtype;                 // of y, shortcut and out
  const void* y;               // rows x K
  const float* scale;          // K
  const float* shift;          // K
  const void* shortcut;        // NHWC as described by shortcut_geom, or nullptr for none
  ShortcutGeometry shortcut_geom;
  const float* shortcut_scale; // shortcut_geom.C, or nullptr meaning 1
  const float* shortcut_shift; // shortcut_geom.C, or nullptr meaning 0
  void* out;                   // rows x K
  bool relu;
};

int launch_bn_add_act(const BnAddActArgs& args, cudaStream_t stream);

// Where BN backward's ReLU mask comes from (see batchnorm.h): act_out if given, else
// y * act_scale + act_shift if given, else no mask.
struct ReluMaskOperands {
  const void* act_out;         // rows x K, dtype of y, or nullptr
  const float* act_scale;      // K, or nullptr
  const float* act_shift;      // K, or nullptr (given together with act_scale)
};

struct BnBackwardReduceArgs {
  int64_t rows;                // N * P * Q
  int64_t channels;            // K
  DType dtype;                 // of grad, y and act_out
  const void* grad;            // rows x K
  const void* y;               // rows x K, the raw conv output BN normalised
  const float* mean;           // K
  const float* invstd;         // K
  ReluMaskOperands mask;
  float* sum_g;                // K
  float* sum_g_xhat;           // K
  float* workspace;            // 2 * K * bn_backward_num_partials(rows) floats
};

// Rows are split into this many slabs, each writing one partial per channel; a second kernel adds
// them in slab order (deterministic, no float atomics).
int64_t bn_backward_num_partials(int64_t rows);
int launch_bn_backward_reduce(const BnBackwardReduceArgs& args, cudaStream_t stream);

struct BnBackwardElemtArgs {
  int64_t rows;                // N * P * Q
  int64_t channels;            // K
  DType dtype;                 // of grad, y, act_out and grad_input
  const void* grad;            // rows x K
  const void* y;               // rows x K
  const float* mean;           // K
  const float* invstd;         // K
  const float* weight;         // K, or nullptr meaning 1
  const float* sum_g;          // K
  const float* sum_g_xhat;     // K
  int64_t count;               // values per channel
  ReluMaskOperands mask;
  void* grad_input;            // rows x K
};

int launch_bn_backward_elemt(const BnBackwardElemtArgs& args, cudaStream_t stream);

// --- train mode backward: conv_bn_backward (fusedres/ops/_ref.py::conv_bn_backward) ---

struct ConvBnBackwardArgs {
  ConvGeometry geom;           // of the forward conv
  DType dtype;                 // of grad, grad_y, x, weight, grad_input and grad_weight
  const void* grad;            // N x P x Q x K (NHWC, dense)
  const void* grad_y;          // N x P x Q x K, read only with grad_coef
  const float* grad_coef;      // 4 x K rows (mean, grad_scale, mean_g, xhat_coef): dy =
                               //    bn_backward_elem(grad, grad_y); nullptr (with grad_y): grad
  const void* x;               // N x H x W x C (NHWC, dense)
  const void* weight;          // K x R x S x C/groups (KRSC, dense)
  const float* scale_in;       // C: the conv input is relu(x * scale_in + shift_in); nullptr
  const float* shift_in;       //    (with shift_in) means x as stored
  const float* mean_in;        // C: xhat = (x - mean_in) * invstd_in for sum_g_xhat; read only
  const float* invstd_in;      //    with sum_g
  void* grad_input;            // N x H x W x C (NHWC, dense), or nullptr when not asked for
  void* grad_weight;           // K x C/groups x R x S (KCRS, contiguous), or nullptr
  float* sum_g;                // C, or nullptr: with scale_in and grad_input, grad_input is
  float* sum_g_xhat;           //    masked by x*scale_in + shift_in > 0 and these are its sums
  float* workspace;            // conv_bn_backward_workspace_floats(...) floats
  bool allow_tf32;             // fp32 inputs may use TF32 tensor cores
};

// Workspace of one launch: per-tile partials of sum_g/sum_g_xhat (with_sums) followed by the
// fp32 split-K partials of the wgrad (need_weight). Both are merged by second kernels in an order
// fixed by the shapes (deterministic, no float atomics).
int64_t conv_bn_backward_workspace_floats(const ConvGeometry& geom, bool with_sums,
                                          bool need_weight);
int launch_conv_bn_backward(const ConvBnBackwardArgs& args, cudaStream_t stream);

}  // namespace fusedres::cuda
