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
  const void* residual;        // N x P x Q x K (NHWC, dense); nullptr means none
  void* out;                   // N x P x Q x K (NHWC, dense)
  bool relu;
  bool allow_tf32;             // fp32 inputs may use TF32 tensor cores
};

// Returns a cudaError_t value (0 on success); the glue turns it into a TORCH_CHECK.
int launch_conv_bn_act(const ConvBnActArgs& args, cudaStream_t stream);

struct BnActBackwardArgs {
  int64_t rows;                // N * P * Q
  int64_t channels;            // K
  DType dtype;                 // of grad_out, out, conv_out, grad_conv
  const void* grad_out;        // rows x K
  const void* out;             // rows x K, the forward output (for the ReLU mask)
  const void* conv_out;        // rows x K raw conv output, or nullptr when grad_scale is not needed
  const float* scale;          // K, or nullptr meaning 1
  void* grad_conv;             // rows x K: act'(out) * grad_out * scale
  float* grad_shift;           // K: sum over rows of act'(out) * grad_out
  float* grad_scale;           // K: sum over rows of act'(out) * grad_out * conv_out (if conv_out)
  float* workspace;            // 2 * K * bn_act_backward_num_partials(rows) floats
  bool relu;
};

// Rows are split into this many slabs; each writes one partial sum per channel, and a second
// kernel adds the partials in a fixed order (deterministic, no float atomics).
int64_t bn_act_backward_num_partials(int64_t rows);
int launch_bn_act_backward(const BnActBackwardArgs& args, cudaStream_t stream);

}  // namespace fusedres::cuda
