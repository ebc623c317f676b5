// The CUDA runtime as the CPU emulator of the tests sees it (tests/cuda_emulator/README.md).
// First on the include path and force-included, so csrc's `#include <cuda_runtime.h>` lands here;
// the toolkit's own headers (/usr/local/cuda/include) supply the types, cudaError_t and the
// host code of cuda_fp16.h / cuda_bf16.h.
#pragma once

#include <cuda_runtime_api.h>  // the toolkit's: cudaError_t, dim3, the host-side qualifiers
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef FUSEDRES_CUDA_EMULATOR
#error "tests/cuda_emulator/include is for the emulator build only (FUSEDRES_CUDA_EMULATOR)"
#endif

// host_defines.h makes __device__, __global__ and __shared__ empty under a host compiler. A
// __shared__ variable becomes a function-local static: blocks run one after another, so one copy
// serves them all. The build lists those statics from the symbol table (a section attribute
// would be dropped on template instantiations), and the runtime poisons them before every block
// and checks WMMA tiles against their bounds.
#undef __shared__
#define __shared__ static
#undef __forceinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__

namespace fusedres_emu {

// Per-fiber state the scheduler publishes before it resumes a CUDA thread.
struct ThreadState;

// Fails the running launch, naming the kernel, block and thread: `op` went wrong, `problem` says how.
[[noreturn]] void fail(const char* op, const char* problem, long long value);
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
// Lane exchange of __shfl_*_sync: every lane in `mask` deposits `value` and receives the value of
// lane src(lane) once all of them have arrived.
uint64_t shuffle(unsigned mask, uint64_t value, int kind, int arg, int width, const char* file,
                 int line);
// The calling thread's lane and the WMMA bookkeeping (uniformity of pointers and ldm in a warp).
int lane_id();
void record_warp_op(uint64_t what);
// Whether p lies in a __shared__ variable, and whether [begin, end) stays inside that one.
bool in_shared(const void* p);
bool shared_range_ok(const void* begin, const void* end);

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
              void (*body)(void*), void* params);
const char* register_kernel(const char* pretty_function);

// kernel<<<grid, block, smem, stream>>>(args...): arguments are converted to the kernel's
// parameter types once (CUDA copies them to parameter space), every thread gets them by value.
template <auto Kernel>
struct Launch;

template <typename... Params, void (*Kernel)(Params...)>
struct Launch<Kernel> {
  static const char* pretty() { return __PRETTY_FUNCTION__; }
  // Registered when the library loads: every kernel instantiation some launcher can reach.
  static inline const char* const name = register_kernel(pretty());

  dim3 grid, block;
  size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    using Tuple = std::tuple<std::decay_t<Params>...>;
    Tuple params(std::forward<Args>(args)...);
    run_grid(name, grid, block, smem,
             [](void* p) { std::apply(Kernel, *static_cast<Tuple*>(p)); }, &params);
  }
};

template <auto Kernel>
Launch<Kernel> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return {grid, block, smem};
}

}  // namespace fusedres_emu

namespace fusedres_emu {
cudaError_t get_last_error();
cudaError_t peek_at_last_error();
const char* get_error_string(cudaError_t e);
}  // namespace fusedres_emu
// The emulator's, not libcudart's (which a process with torch has loaded too).
#define cudaGetLastError ::fusedres_emu::get_last_error
#define cudaPeekAtLastError ::fusedres_emu::peek_at_last_error
#define cudaGetErrorString ::fusedres_emu::get_error_string

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

#define __syncthreads() ::fusedres_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) \
  ::fusedres_emu::syncwarp(::fusedres_emu::mask_or_full(__VA_ARGS__), __FILE__, __LINE__)

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace fusedres_emu {
template <typename T>
T shfl(unsigned mask, T v, int kind, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  __builtin_memcpy(&bits, &v, sizeof(T));
  bits = shuffle(mask, bits, kind, arg, width, file, line);
  T out;
  __builtin_memcpy(&out, &bits, sizeof(T));
  return out;
}
enum ShuffleKind { kShflIdx, kShflUp, kShflDown, kShflXor };
inline unsigned mask_or_full(unsigned mask = 0xffffffffu) { return mask; }
inline int width_or_warp(int width = 32) { return width; }
}  // namespace fusedres_emu

#define __shfl_sync(mask, v, src, ...) \
  ::fusedres_emu::shfl(mask, v, ::fusedres_emu::kShflIdx, src, ::fusedres_emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::fusedres_emu::shfl(mask, v, ::fusedres_emu::kShflUp, d, ::fusedres_emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::fusedres_emu::shfl(mask, v, ::fusedres_emu::kShflDown, d, ::fusedres_emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::fusedres_emu::shfl(mask, v, ::fusedres_emu::kShflXor, m, ::fusedres_emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
