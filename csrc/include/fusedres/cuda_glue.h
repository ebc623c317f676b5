// Helpers for the ATen glue that calls the raw-pointer CUDA launchers (.cpp only).
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "fusedres/cuda_launchers.h"

namespace fusedres::cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fusedres CUDA kernels take float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

// Whether fp32 inputs may use TF32 tensor cores: the setting eager convolutions follow
// (torch.backends.cudnn.conv.fp32_precision, which the legacy torch.backends.cudnn.allow_tf32
// sets too). allowTF32CuDNN() without an op reads the legacy flag and throws when the conv and
// rnn settings differ; the Float32Op overload is there in torch 2.11 and 2.14 alike.
inline bool conv_allows_tf32() {
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
}

// Launchers return a cudaError_t as int; 0 is cudaSuccess.
inline void check_launch(int status, const char* op) {
  TORCH_CHECK(status == 0, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)), " (cudaError_t ", status, ")");
}

}  // namespace fusedres::cuda
