// The emulator's runtime: a fiber per CUDA thread, blocks one after another, barriers that check
// who arrives, shared memory poisoned per block, and the registry of kernels for the coverage test.
#include <cuda_runtime.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;


namespace fusedres_emu {
namespace {

enum class Order { kForward = 0, kReverse = 1, kRandom = 2 };
enum class State { kRunnable, kAtBarrier, kAtWarpOp, kExited };

constexpr size_t kStackBytes =
#if defined(__SANITIZE_ADDRESS__)
    512 << 10;
#else
    256 << 10;
#endif
constexpr int kMaxThreads = 1024;

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // kStackBytes, above a guard page
  uint3 idx;
  int linear = 0;
  State state = State::kRunnable;
  const char* file = nullptr;  // the barrier or warp op it waits at
  int line = 0;
  uint64_t warp_log = 0;  // hash of its WMMA collectives, compared across the warp
  // A pending warp collective.
  unsigned mask = 0;
  int kind = -1;  // -1: __syncwarp
  int arg = 0, width = 32;
  uint64_t value = 0, result = 0;
};

struct Runtime {
  Order order = Order::kForward;
  uint64_t seed = 0;
  std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreads);
  int threads = 0;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  void (*body)(void*) = nullptr;
  void* params = nullptr;
  const char* kernel = "";
  uint64_t launches = 0;
  bool failed = false;
  cudaError_t last_error = cudaSuccess;
  std::string message;
  std::map<std::string, long> launched;
  // The __shared__ variables (function-local statics of the kernel sources), sorted by address.
  struct Var {
    char* begin;
    size_t size;
    std::string name;
  };
  std::vector<Var> shared;
};

Runtime& rt() {
  static Runtime r;
  return r;
}

std::set<std::string>& registry() {
  static std::set<std::string> r;
  return r;
}

std::string where(const Fiber* f) {
  const Runtime& r = rt();
  char buf[512];
  std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", r.kernel,
                blockIdx.x, blockIdx.y, blockIdx.z, f ? f->idx.x : 0u, f ? f->idx.y : 0u,
                f ? f->idx.z : 0u);
  return buf;
}

std::string at(const Fiber& f) {
  return std::string(f.file ? f.file : "?") + ":" + std::to_string(f.line);
}

void switch_to(ucontext_t* from, ucontext_t* to, const void* bottom, size_t size, bool dying) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake_stack, bottom, size);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)bottom, (void)size, (void)dying;
  swapcontext(from, to);
#endif
}

// The scheduler's own stack, for the sanitizer's bookkeeping when a fiber switches back.
const void* g_main_bottom = nullptr;
size_t g_main_size = 0;

void yield_to_scheduler(bool dying = false) {
  Runtime& r = rt();
  switch_to(&r.current->ctx, &r.scheduler, g_main_bottom, g_main_size, dying);
}

void trampoline() {
  Runtime& r = rt();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &g_main_bottom, &g_main_size);
#endif
  r.body(r.params);
  r.current->state = State::kExited;
  yield_to_scheduler(/*dying=*/true);
}

// Failures found by the scheduler (between fibers): the launch stops after this block.
void record_failure(const std::string& text) {
  Runtime& r = rt();
  if (!r.failed) r.message = text;
  r.failed = true;
}

// Failures found in a fiber: the thread stops here and the launch after this block.
[[noreturn]] void fail_launch(const std::string& text) {
  Runtime& r = rt();
  record_failure(text);
  if (r.current != nullptr) {
    r.current->state = State::kExited;
    yield_to_scheduler(true);
  }
  std::fprintf(stderr, "fusedres emulator: %s\n", text.c_str());
  std::abort();
}

void resume(Fiber& f) {
  Runtime& r = rt();
  r.current = &f;
  threadIdx = f.idx;
  switch_to(&r.scheduler, &f.ctx, f.stack, kStackBytes, false);
  r.current = nullptr;
}

// All lanes of a warp must have issued the same WMMA collectives with the same pointers and ldm.
bool check_warp_logs(std::string& why) {
  Runtime& r = rt();
  for (int w0 = 0; w0 < r.threads; w0 += 32) {
    const int end = std::min(r.threads, w0 + 32);
    for (int t = w0 + 1; t < end; ++t) {
      if (r.fibers[t].warp_log != r.fibers[w0].warp_log) {
        why = "lanes " + std::to_string(w0 % 32) + " and " + std::to_string(t % 32) + " of warp " +
              std::to_string(w0 / 32) +
              " issued different WMMA collectives (divergent, or pointer/ldm not warp-uniform); "
              "thread (" + std::to_string(r.fibers[t].idx.x) + "," +
              std::to_string(r.fibers[t].idx.y) + "," + std::to_string(r.fibers[t].idx.z) + ")";
        return false;
      }
    }
  }
  return true;
}

// Completes the warp collectives whose lanes have all arrived; returns whether any did.
bool resolve_warp_ops() {
  Runtime& r = rt();
  bool progressed = false;
  for (int w0 = 0; w0 < r.threads; w0 += 32) {
    const int end = std::min(r.threads, w0 + 32);
    Fiber* first = nullptr;
    for (int t = w0; t < end; ++t) {
      if (r.fibers[t].state == State::kAtWarpOp) {
        first = &r.fibers[t];
        break;
      }
    }
    if (first == nullptr) continue;
    bool ready = true;
    for (int t = w0; t < end && ready; ++t) {
      Fiber& f = r.fibers[t];
      if (f.state != State::kAtWarpOp) continue;
      for (int lane = 0; lane < 32; ++lane) {
        if (!(f.mask >> lane & 1u)) continue;
        if (w0 + lane >= r.threads) {
          {
          record_failure(where(&f) + ": " + at(f) + ": warp op mask names lane " +
                      std::to_string(lane) + ", past the block's threads");
          return false;
        }
        }
        const Fiber& o = r.fibers[w0 + lane];
        if (o.state == State::kExited) {
          {
          record_failure(where(&f) + ": " + at(f) + ": warp op waits for lane " +
                      std::to_string(lane) + ", which has exited");
          return false;
        }
        }
        if (o.state != State::kAtWarpOp) {
          ready = false;
          break;
        }
        if (o.line != f.line || o.file != f.file || o.mask != f.mask || o.kind != f.kind) {
          {
          record_failure(where(&f) + ": lanes wait at different warp ops: " + at(f) + " and " +
                      at(o) + " (or different masks)");
          return false;
        }
        }
      }
    }
    if (!ready) continue;
    for (int t = w0; t < end; ++t) {
      Fiber& f = r.fibers[t];
      if (f.state != State::kAtWarpOp) continue;
      const int lane = t - w0;
      const int base = lane / f.width * f.width;
      int src = lane;
      switch (f.kind) {
        case kShflIdx: src = base + ((f.arg % f.width) + f.width) % f.width; break;
        case kShflUp: src = lane - f.arg >= base ? lane - f.arg : lane; break;
        case kShflDown: src = lane + f.arg < base + f.width ? lane + f.arg : lane; break;
        case kShflXor: src = (lane ^ f.arg) < base + f.width ? lane ^ f.arg : lane; break;
        default: break;
      }
      if (f.kind >= 0) {
        if (!(f.mask >> src & 1u)) {
          {
          record_failure(where(&f) + ": " + at(f) + ": shuffle reads lane " + std::to_string(src) +
                      ", which is not in the mask");
          return false;
        }
        }
        f.result = r.fibers[w0 + src].value;
      }
    }
    for (int t = w0; t < end; ++t) {
      if (r.fibers[t].state == State::kAtWarpOp) r.fibers[t].state = State::kRunnable;
    }
    progressed = true;
  }
  return progressed;
}

std::vector<int> schedule(uint64_t round) {
  Runtime& r = rt();
  std::vector<int> ids(r.threads);
  for (int i = 0; i < r.threads; ++i) ids[i] = i;
  if (r.order == Order::kReverse) {
    std::reverse(ids.begin(), ids.end());
  } else if (r.order == Order::kRandom) {
    std::mt19937_64 rng(r.seed ^ (r.launches * 0x9e3779b97f4a7c15ull) ^
                        ((uint64_t(blockIdx.x) << 32 | uint64_t(blockIdx.y) << 16 | blockIdx.z) *
                         0xbf58476d1ce4e5b9ull) ^ round);
    std::shuffle(ids.begin(), ids.end(), rng);
  }
  return ids;
}

#if defined(__SANITIZE_ADDRESS__)
// Uninstrumented: in the sanitizer build a symbol's size includes the redzone ASan placed behind
// the variable, which memset would report.
__attribute__((no_sanitize_address)) void poison(char* p, size_t n) {
  for (size_t i = 0; i < n; ++i) reinterpret_cast<volatile char*>(p)[i] = static_cast<char>(0xff);
}
#else
void poison(char* p, size_t n) { std::memset(p, 0xff, n); }
#endif

const Runtime::Var* shared_var(const void* p) {
  const auto& vars = rt().shared;
  const char* c = static_cast<const char*>(p);
  auto it = std::upper_bound(vars.begin(), vars.end(), c,
                             [](const char* a, const Runtime::Var& v) { return a < v.begin; });
  if (it == vars.begin()) return nullptr;
  --it;
  return c < it->begin + it->size ? &*it : nullptr;
}

void run_block() {
  Runtime& r = rt();
  for (const auto& v : r.shared) poison(v.begin, v.size);
  for (int t = 0; t < r.threads; ++t) {
    Fiber& f = r.fibers[t];
    if (f.stack == nullptr) {
      const size_t page = 4096;
      void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) {
          record_failure("cannot map a fiber stack");
          return;
        }
      mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
      f.stack = static_cast<char*>(m) + page;
    }
    f.linear = t;
    f.idx = {static_cast<unsigned>(t % blockDim.x),
             static_cast<unsigned>(t / blockDim.x % blockDim.y),
             static_cast<unsigned>(t / (blockDim.x * blockDim.y))};
    f.state = State::kRunnable;
    f.warp_log = 0;
    f.file = nullptr;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
#if defined(__SANITIZE_ADDRESS__)
    // makecontext has placed the stack; with it unset, ASan's swapcontext interceptor no longer
    // clears the whole stack's shadow on every switch (the fiber annotations keep ASan right).
    f.ctx.uc_stack.ss_sp = nullptr;
    f.ctx.uc_stack.ss_size = 0;
#endif
  }

  for (uint64_t round = 0;; ++round) {
    for (int t : schedule(round)) {
      if (r.fibers[t].state == State::kRunnable) resume(r.fibers[t]);
      if (r.failed) return;
    }
    if (resolve_warp_ops()) continue;
    if (r.failed) return;
    int exited = 0, at_barrier = 0;
    const Fiber* barrier = nullptr;
    const Fiber* exited_one = nullptr;
    for (int t = 0; t < r.threads; ++t) {
      const Fiber& f = r.fibers[t];
      if (f.state == State::kExited) {
        ++exited;
        exited_one = &f;
      } else if (f.state == State::kAtBarrier) {
        ++at_barrier;
        if (barrier == nullptr) barrier = &f;
      }
    }
    std::string why;
    if (exited == r.threads) {
      if (!check_warp_logs(why)) {
          record_failure(where(nullptr) + ": " + why);
          return;
        }
      return;
    }
    if (at_barrier + exited == r.threads) {
      if (exited > 0) {
        {
          record_failure(where(barrier) + ": waits at __syncthreads (" + at(*barrier) + ") while " +
                    std::to_string(exited) + " thread(s) of the block have exited, e.g. (" +
                    std::to_string(exited_one->idx.x) + "," + std::to_string(exited_one->idx.y) +
                    "," + std::to_string(exited_one->idx.z) + ")");
          return;
        }
      }
      for (int t = 0; t < r.threads; ++t) {
        const Fiber& f = r.fibers[t];
        if (f.line != barrier->line || f.file != barrier->file) {
          {
          record_failure(where(&f) + ": waits at __syncthreads " + at(f) + " while thread (" +
                      std::to_string(barrier->idx.x) + "," + std::to_string(barrier->idx.y) +
                      "," + std::to_string(barrier->idx.z) + ") waits at " + at(*barrier));
          return;
        }
        }
      }
      if (!check_warp_logs(why)) {
          record_failure(where(nullptr) + ": " + why);
          return;
        }
      for (int t = 0; t < r.threads; ++t) r.fibers[t].state = State::kRunnable;
      continue;
    }
    // Some threads wait at a warp op others of their warp never reach, or at a barrier they
    // never all reach.
    for (int t = 0; t < r.threads; ++t) {
      const Fiber& f = r.fibers[t];
      if (f.state == State::kAtWarpOp) {
        {
          record_failure(where(&f) + ": deadlock: waits at a warp op (" + at(f) +
                    ") that lanes of its mask never reach" +
                    (barrier ? " (some wait at __syncthreads " + at(*barrier) + ")" : ""));
          return;
        }
      }
    }
    {
          record_failure(where(nullptr) + ": deadlock");
          return;
        }
  }
}

}  // namespace

void fail(const char* op, const char* problem, long long value) {
  Runtime& r = rt();
  fail_launch(where(r.current) + ": " + op + ": " + problem + " (" + std::to_string(value) + ")");
}

void syncthreads(const char* file, int line) {
  Runtime& r = rt();
  r.current->state = State::kAtBarrier;
  r.current->file = file;
  r.current->line = line;
  yield_to_scheduler();
}

void syncwarp(unsigned mask, const char* file, int line) {
  Runtime& r = rt();
  Fiber& f = *r.current;
  if (!(mask >> (f.linear % 32) & 1u)) fail("__syncwarp", "the calling lane is not in the mask", mask);
  f.state = State::kAtWarpOp;
  f.file = file;
  f.line = line;
  f.mask = mask;
  f.kind = -1;
  yield_to_scheduler();
}

uint64_t shuffle(unsigned mask, uint64_t value, int kind, int arg, int width, const char* file,
                 int line) {
  Runtime& r = rt();
  Fiber& f = *r.current;
  if (!(mask >> (f.linear % 32) & 1u)) fail("__shfl_*_sync", "the calling lane is not in the mask", mask);
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("__shfl_*_sync", "width is not a power of two in [1, 32]", width);
  }
  f.state = State::kAtWarpOp;
  f.file = file;
  f.line = line;
  f.mask = mask;
  f.kind = kind;
  f.arg = arg;
  f.width = width;
  f.value = value;
  yield_to_scheduler();
  return f.result;
}

int lane_id() { return rt().current->linear % 32; }

void record_warp_op(uint64_t what) {
  uint64_t& log = rt().current->warp_log;
  log = (log ^ what) * 0x100000001b3ull + 0x9e3779b97f4a7c15ull;
}

bool in_shared(const void* p) { return shared_var(p) != nullptr; }

bool shared_range_ok(const void* begin, const void* end) {
  const Runtime::Var* v = shared_var(begin);
  return v != nullptr && static_cast<const char*>(end) <= v->begin + v->size;
}

const char* register_kernel(const char* pretty_function) {
  // "... [with ...; void (* Kernel)(Params ...) = ns::kernel<args>]" -> "ns::kernel<args>"
  std::string s(pretty_function);
  const size_t eq = s.rfind(" = ");
  if (eq != std::string::npos) s = s.substr(eq + 3, s.size() - eq - 4);
  return registry().insert(s).first->c_str();
}

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
              void (*body)(void*), void* params) {
  Runtime& r = rt();
  if (r.failed) return;  // a failed launch is sticky, as on the device
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    r.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  // No kernel declares extern __shared__ (a macro prefix cannot express it for the host
  // compiler), so dynamic shared memory has nothing to back.
  if (dynamic_smem != 0) {
    r.last_error = cudaErrorInvalidValue;
    return;
  }
  ++r.launched[kernel];
  ++r.launches;
  r.kernel = kernel;
  r.body = body;
  r.params = params;
  r.threads = static_cast<int>(threads);
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        run_block();
        if (r.failed) {
          r.last_error = cudaErrorLaunchFailure;
#if defined(__SANITIZE_ADDRESS__)
          // Abandoned fibers leave their frames' redzones poisoned on stacks the next launch reuses.
          for (int t = 0; t < r.threads; ++t) {
            __asan_unpoison_memory_region(r.fibers[t].stack, kStackBytes);
          }
#endif
          return;
        }
      }
    }
  }
}

cudaError_t get_last_error() {
  auto& r = rt();
  const cudaError_t e = r.failed ? cudaErrorLaunchFailure : r.last_error;
  r.last_error = cudaSuccess;
  return e;
}

cudaError_t peek_at_last_error() {
  auto& r = rt();
  return r.failed ? cudaErrorLaunchFailure : r.last_error;
}

const char* get_error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "CUDA error";
  }
}

}  // namespace fusedres_emu

// Control and introspection for the tests (ctypes).
extern "C" {

// order: 0 forward, 1 reverse, 2 random (seeded).
void fusedres_emu_configure(int order, uint64_t seed) {
  auto& r = fusedres_emu::rt();
  r.order = static_cast<fusedres_emu::Order>(order);
  r.seed = seed;
}

// Clears a failed launch (the device would need a new context).
void fusedres_emu_clear() {
  auto& r = fusedres_emu::rt();
  r.failed = false;
  r.last_error = cudaSuccess;
  r.message.clear();
}

const char* fusedres_emu_error() { return fusedres_emu::rt().message.c_str(); }

// Reads the __shared__ variables the build listed ("offset size symbol" per line, offsets from
// the library's load address); returns how many, or -1 if the file cannot be read.
int fusedres_emu_load_shared_table(const char* path) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&fusedres_emu_load_shared_table), &info) == 0) return -1;
  std::ifstream in(path);
  if (!in) return -1;
  auto& vars = fusedres_emu::rt().shared;
  vars.clear();
  unsigned long long offset, size;
  std::string symbol;
  while (in >> std::hex >> offset >> size >> symbol) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(symbol.c_str(), nullptr, nullptr, &status);
    vars.push_back({static_cast<char*>(info.dli_fbase) + offset, static_cast<size_t>(size),
                    status == 0 ? demangled : symbol});
    std::free(demangled);
  }
  std::sort(vars.begin(), vars.end(), [](const auto& a, const auto& b) { return a.begin < b.begin; });
  return static_cast<int>(vars.size());
}

// Newline-separated kernel instantiations: every one a launcher can reach (launched = 0), or
// those launched so far with their launch counts ("count\tname").
const char* fusedres_emu_kernels(int launched) {
  static std::string out;
  out.clear();
  if (launched) {
    for (const auto& [name, n] : fusedres_emu::rt().launched) {
      out += std::to_string(n) + "\t" + name + "\n";
    }
  } else {
    for (const auto& name : fusedres_emu::registry()) out += name + "\n";
  }
  return out.c_str();
}

}  // extern "C"
