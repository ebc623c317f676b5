// The one spelling of a kernel launch in csrc (.cu only):
//
//   FUSEDRES_LAUNCH(grid, block, smem, stream, kernel<T, ...>)(args...);
//
// is `kernel<<<grid, block, smem, stream>>>(args...)` under nvcc and a launch on the CPU emulator
// of the tests (tests/cuda_emulator) under a host compiler, so the .cu text is the same in both
// builds. The kernel comes last because its template arguments hold commas.
#pragma once

#include <cuda_runtime.h>

namespace fusedres::cuda {

// Static shared memory one block may declare without the opt-in attribute, on every arch. Each
// kernel static_asserts its total against it: the emulator cannot see the device's limit.
constexpr int kMaxStaticSharedBytes = 48 * 1024;

}  // namespace fusedres::cuda

#if defined(FUSEDRES_CUDA_EMULATOR)
#define FUSEDRES_LAUNCH(grid, block, smem, stream, ...) \
  ::fusedres_emu::launch<&__VA_ARGS__>(grid, block, smem, stream)
#else
#define FUSEDRES_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
