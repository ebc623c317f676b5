// Helpers for the ATen glue that calls the raw-pointer CUDA launchers (.cpp only).
#pragma once

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

// Launchers return a cudaError_t as int; 0 is cudaSuccess.
inline void check_launch(int status, const char* op) {
  TORCH_CHECK(status == 0, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)), " (cudaError_t ", status, ")");
}

}  // namespace fusedres::cuda
