// bn_finalize on CUDA: one thread per channel turns (mean, m2) into scale, shift and invstd and
// updates the running statistics in place (batchnorm.h has the math). K elements of work: the
// launch is the cost, which is why nothing else is fused here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedres/batchnorm.h"
#include "fusedres/cuda_dtype.cuh"
#include "fusedres/cuda_launch.h"
#include "fusedres/cuda_launchers.h"

namespace fusedres::cuda {
namespace {

constexpr int kThreads = 256;

// RunningT: storage type of the running statistics (fp32 buffers, or fp16/bf16 after .half()).
template <typename RunningT>
__global__ void __launch_bounds__(kThreads) bn_finalize_kernel(const BnFinalizeArgs args) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= args.channels) return;
  const float mean = args.mean[k];
  const float m2 = args.m2[k];
  const BnChannelAffine a =
      bn_batch_affine(mean, m2, args.count, args.weight != nullptr ? args.weight[k] : 1.f,
                      args.bias != nullptr ? args.bias[k] : 0.f, args.eps);
  args.scale[k] = a.scale;
  args.shift[k] = a.shift;
  args.invstd[k] = a.invstd;
  if (args.running_mean == nullptr) return;
  auto* running_mean = static_cast<RunningT*>(args.running_mean);
  auto* running_var = static_cast<RunningT*>(args.running_var);
  running_mean[k] =
      from_float<RunningT>(running_stat_update(to_float(running_mean[k]), mean, args.momentum));
  running_var[k] = from_float<RunningT>(running_stat_update(
      to_float(running_var[k]), unbiased_variance(m2, args.count), args.momentum));
}

template <typename RunningT>
int launch_for_running_dtype(const BnFinalizeArgs& args, cudaStream_t stream) {
  const int64_t blocks = (args.channels + kThreads - 1) / kThreads;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  FUSEDRES_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream,
                  bn_finalize_kernel<RunningT>)(args);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_bn_finalize(const BnFinalizeArgs& args, cudaStream_t stream) {
  if (args.channels < 0 || args.count <= 0) return cudaErrorInvalidValue;
  if (args.channels == 0) return cudaSuccess;
  if (args.mean == nullptr || args.m2 == nullptr || args.scale == nullptr ||
      args.shift == nullptr || args.invstd == nullptr ||
      (args.running_mean == nullptr) != (args.running_var == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.running_dtype, [&](auto tag) {
    return launch_for_running_dtype<decltype(tag)>(args, stream);
  });
}

}  // namespace fusedres::cuda
