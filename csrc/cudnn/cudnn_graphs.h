// The cuDNN graphs of the `cudnn` backend behind a plain API: no torch and no cuDNN header here,
// so cudnn_graphs.cpp (the cudnn-frontend, ~70 s and 2 GB to compile) and the ATen glue
// (cudnn_glue.cpp) are separate translation units that share only this file.
#pragma once

#include <cstdint>
#include <string>

namespace fusedres::cudnn_graphs {

// The fusions cuDNN offers for ResNet (NVIDIA's MLPerf path), as used by the fusedres ops.
enum class Pattern : int {
  kConvBnAct = 0,   // eval: [relu](conv(x, w) * scale + shift [+ residual]), scale/shift fp32
  kConvBnStats = 1, // train: conv([relu(x * scale + shift)], w) -> genstats (sum, sum of squares)
  kBnFinalize = 2,  // sum, sum of squares -> BN scale/shift, saved mean/invstd, running stats
  kWgrad = 3,       // dw = wgrad(dy, [relu(x * scale + shift)])  (the prologue recomputed)
  kDgrad = 4,       // dx = dgrad(dy, w) [-> dReLU by x * scale + shift > 0 -> dBN sums]
};
constexpr int kNumPatterns = 5;
const char* pattern_name(Pattern p);

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

// Every pointer a graph may read or write; a graph uses a subset (its tensors' uids are slot + 1).
enum Slot : int {
  kX, kW, kScale, kShift, kResidual, kY, kSum, kSqSum,            // forward convs
  kDY, kDX, kDW, kMean, kInvStd, kDScale, kDBias,                  // backward convs
  kEqScaleDy, kEqScaleX, kEqBias,                                  // dBN outputs cuDNN insists on
  kGamma, kBeta, kRunMeanIn, kRunVarIn, kEps, kMomentum, kCount,   // bn_finalize inputs
  kEqScale, kEqShift, kSavedMean, kSavedInvStd, kRunMeanOut, kRunVarOut,
  kNumSlots
};

struct TensorDesc {
  int64_t dim[4] = {0, 0, 0, 0};    // N, C, H, W (filters: K, C, R, S)
  int64_t stride[4] = {0, 0, 0, 0}; // in elements
};

// Everything a graph and its plans depend on, except the device (a separate part of the key).
struct GraphSpec {
  Pattern pattern = Pattern::kConvBnAct;
  DType dtype = DType::kHalf;  // io dtype of the activations and filters; stats are fp32
  bool prologue = false;       // kConvBnStats/kWgrad: relu(x*scale+shift) input; kDgrad: dReLU + dBN sums
  bool residual = false;       // kConvBnAct
  bool relu = true;            // kConvBnAct
  bool allow_tf32 = false;     // fp32 only: allow tensor-core (TF32) engines
  TensorDesc x, w, y, residual_desc;  // conv input, filter, conv output (dy for backward), residual
  int64_t conv_stride[2] = {1, 1}, padding[2] = {0, 0}, dilation[2] = {1, 1};
  int64_t channels = 0;        // kBnFinalize
};

// Where a graph got to: planned (plans built), or why not.
enum class Status : int {
  kPlanned = 0,
  kNeedsRuntimeCompilation = 1,  // only run-time-compiled engines: cannot tell without libcuda/a GPU
  kUnsupported = 2,              // cuDNN has no engine for it (on this arch)
  kInvalid = 3,                  // the graph did not validate (bad shapes/strides)
  kError = 4,                    // anything else (no cuDNN, no device, ...)
};
const char* status_name(Status s);

struct PlanResult {
  Status status = Status::kError;
  bool validated = false;
  int64_t num_plans = 0;       // execution plans built (heuristics mode A, then fallback)
  int64_t workspace = 0;       // bytes, of the plan execution uses
  std::string stage;           // the step that failed: validate, build_operation_graph, ...
  std::string message;         // cuDNN's message
  uint64_t graph_id = 0;       // the cached graph's identity (equal ids: the same cache entry)
  bool cache_hit = false;
};

// Dense channels_last strides of an NCHW shape, and the conv output of `spec` in that layout.
TensorDesc nhwc_desc(int64_t n, int64_t c, int64_t h, int64_t w);
TensorDesc conv_output_nhwc(const GraphSpec& spec);

// The key a graph is cached under (pattern, dtype, flags, shapes, strides, conv parameters).
std::string spec_key(const GraphSpec& spec);

// Plans `spec` for a GPU described by `device_properties_json` (cudnn-frontend's
// DeviceProperties serialization), no GPU needed. Cached per (spec, properties, sm version,
// SM count).
PlanResult plan_offline(const GraphSpec& spec, const std::string& device_properties_json, int sm_version,
                        int sm_count);

// Builds (once, then from the cache) the graph and plan for `spec` on CUDA device `device`.
PlanResult prepare(const GraphSpec& spec, int device);

// Runs the cached graph of `spec` (prepare() must have returned kPlanned for this device) on
// `stream` with `ptrs[slot]` and a workspace of at least the planned size. Host-side only work:
// no allocation, no synchronization (capturable in a CUDA graph).
PlanResult execute(const GraphSpec& spec, int device, void* stream, void* const* ptrs, void* workspace);

// cuDNN/frontend versions and whether a libcudnn could be loaded (empty error when it could).
std::string runtime_info();
int64_t cache_size();

// For callers without the C++ types (Python through ctypes, the tests, the support table):
// `request` is a JSON object naming a GraphSpec's fields (pattern, dtype, prologue, residual,
// relu, allow_tf32, x/w/y/residual_desc as {"dim": [4], "stride": [4]} (stride and y default to
// dense channels_last), conv_stride, padding, dilation, channels) and either
// device_properties (the JSON text), sm_version and sm_count for planning without a GPU, or
// device (an index) to plan on that GPU. Writes the PlanResult as JSON into `out` (NUL-terminated,
// truncated to `capacity`) and returns the full length, or -1 when `request` is malformed
// (then `out` holds the reason).
extern "C" int64_t fusedres_cudnn_plan_json(const char* request, char* out, int64_t capacity);
extern "C" int64_t fusedres_cudnn_runtime_info(char* out, int64_t capacity);
extern "C" int64_t fusedres_cudnn_cache_size();

}  // namespace fusedres::cudnn_graphs
