// The cuDNN graphs of the `cudnn` backend, built with the header-only cudnn-frontend.
//
// Its own translation unit, with no torch header: the frontend alone costs ~70 s and 2 GB of RAM
// to compile. Built with NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING, so it links no cuDNN: every
// cuDNN call goes through `cudnn_dlhandle`, pointed at the libcudnn torch has already loaded.
#include "cudnn_graphs.h"

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include <cudnn_frontend.h>

namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;  // the frontend's dl handle (NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING)
}  // namespace cudnn_frontend

namespace fusedres::cudnn_graphs {
namespace fe = cudnn_frontend;
using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;

namespace {

// Torch's own libcudnn when torch loaded one (RTLD_NOLOAD finds it without loading a second copy),
// else whatever the loader finds.
const std::string& load_cudnn() {
  static std::string error = [] {
    void* handle = dlopen("libcudnn.so.9", RTLD_NOLOAD | RTLD_LAZY);
    if (handle == nullptr) handle = dlopen("libcudnn.so.9", RTLD_NOW);
    if (handle == nullptr) {
      const char* msg = dlerror();
      return std::string("cannot load libcudnn.so.9: ") + (msg ? msg : "unknown dlopen error");
    }
    fe::cudnn_dlhandle = handle;
    return std::string();
  }();
  return error;
}

fe::DataType_t io_type(DType d) {
  switch (d) {
    case DType::kHalf: return fe::DataType_t::HALF;
    case DType::kBFloat16: return fe::DataType_t::BFLOAT16;
    case DType::kFloat: return fe::DataType_t::FLOAT;
  }
  return fe::DataType_t::NOT_SET;
}

std::vector<int64_t> vec(const int64_t (&a)[4]) { return {a[0], a[1], a[2], a[3]}; }
std::vector<int64_t> vec2(const int64_t (&a)[2]) { return {a[0], a[1]}; }

// A per-channel (1, C, 1, 1) tensor.
fe::graph::Tensor_attributes channel_tensor(const char* name, Slot slot, int64_t c, fe::DataType_t type) {
  return fe::graph::Tensor_attributes()
      .set_name(name)
      .set_uid(slot + 1)
      .set_dim({1, c, 1, 1})
      .set_stride({c, 1, c, c})
      .set_data_type(type);
}

fe::graph::Tensor_attributes big_tensor(const char* name, Slot slot, const TensorDesc& d, fe::DataType_t type) {
  return fe::graph::Tensor_attributes()
      .set_name(name)
      .set_uid(slot + 1)
      .set_dim(vec(d.dim))
      .set_stride(vec(d.stride))
      .set_data_type(type);
}

void mark_output(const TensorPtr& t, Slot slot, fe::DataType_t type) {
  t->set_output(true).set_uid(slot + 1).set_data_type(type);
}

fe::graph::Pointwise_attributes pw(const char* name, fe::PointwiseMode_t mode) {
  return fe::graph::Pointwise_attributes().set_name(name).set_mode(mode);
}

// relu(x * scale + shift): the previous BN+ReLU as a prologue, scale/shift in the io dtype (the
// pre-built fp16 engines take no other; the op casts them).
TensorPtr bn_relu_prologue(fe::graph::Graph& g, const TensorPtr& x, int64_t c, fe::DataType_t io) {
  auto scale = g.tensor(channel_tensor("scale_in", kScale, c, io));
  auto shift = g.tensor(channel_tensor("shift_in", kShift, c, io));
  auto mul = g.pointwise(x, scale, pw("prologue_scale", fe::PointwiseMode_t::MUL));
  auto add = g.pointwise(mul, shift, pw("prologue_shift", fe::PointwiseMode_t::ADD));
  return g.pointwise(add, pw("prologue_relu", fe::PointwiseMode_t::RELU_FWD));
}

template <typename Attributes>
Attributes conv_attributes(const char* name, const GraphSpec& s) {
  Attributes a;
  a.set_name(name).set_padding(vec2(s.padding)).set_stride(vec2(s.conv_stride)).set_dilation(vec2(s.dilation));
  return a;
}

// Describes `s` as a graph (no cuDNN call yet).
void define(const GraphSpec& s, fe::graph::Graph& g) {
  const auto io = io_type(s.dtype);
  const auto f32 = fe::DataType_t::FLOAT;
  g.set_io_data_type(io).set_intermediate_data_type(f32).set_compute_data_type(f32);
  const int64_t c = s.x.dim[1], k = s.w.dim[0];
  switch (s.pattern) {
    case Pattern::kConvBnAct: {
      auto x = g.tensor(big_tensor("x", kX, s.x, io));
      auto w = g.tensor(big_tensor("w", kW, s.w, io));
      auto conv = g.conv_fprop(x, w, conv_attributes<fe::graph::Conv_fprop_attributes>("conv", s));
      auto scale = g.tensor(channel_tensor("scale", kScale, k, f32));
      auto shift = g.tensor(channel_tensor("shift", kShift, k, f32));
      auto y = g.pointwise(conv, scale, pw("scale", fe::PointwiseMode_t::MUL));
      y = g.pointwise(y, shift, pw("shift", fe::PointwiseMode_t::ADD));
      if (s.residual) {
        auto r = g.tensor(big_tensor("residual", kResidual, s.residual_desc, io));
        y = g.pointwise(y, r, pw("residual", fe::PointwiseMode_t::ADD));
      }
      if (s.relu) {
        y = g.pointwise(y, pw("relu", fe::PointwiseMode_t::RELU_FWD));
      }
      mark_output(y, kY, io);
      y->set_stride(vec(s.y.stride));
      break;
    }
    case Pattern::kConvBnStats: {
      TensorPtr x = g.tensor(big_tensor("x", kX, s.x, io));
      auto w = g.tensor(big_tensor("w", kW, s.w, io));
      if (s.prologue) x = bn_relu_prologue(g, x, c, io);
      auto y = g.conv_fprop(x, w, conv_attributes<fe::graph::Conv_fprop_attributes>("conv", s));
      mark_output(y, kY, io);
      y->set_stride(vec(s.y.stride));
      auto [sum, sq_sum] = g.genstats(y, fe::graph::Genstats_attributes().set_name("genstats"));
      mark_output(sum, kSum, f32);
      mark_output(sq_sum, kSqSum, f32);
      break;
    }
    case Pattern::kBnFinalize: {
      const int64_t ch = s.channels;
      auto t = [&](const char* name, Slot slot) { return g.tensor(channel_tensor(name, slot, ch, f32)); };
      // Host scalars passed by value at each call: momentum may change every step
      // (momentum=None), and a graph per value would defeat the cache.
      auto scalar = [&](const char* name, Slot slot, fe::DataType_t type) {
        return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(slot + 1).set_dim({1, 1, 1, 1})
                            .set_stride({1, 1, 1, 1}).set_data_type(type).set_is_pass_by_value(true));
      };
      auto sum = t("sum", kSum), sq_sum = t("sq_sum", kSqSum), gamma = t("gamma", kGamma), beta = t("beta", kBeta);
      auto run_mean = t("running_mean", kRunMeanIn), run_var = t("running_var", kRunVarIn);
      auto eps = scalar("eps", kEps, f32), momentum = scalar("momentum", kMomentum, f32);
      auto count = scalar("count", kCount, fe::DataType_t::INT64);
      auto attrs = fe::graph::BN_finalize_attributes().set_name("bn_finalize");
      attrs.set_previous_running_stats(run_mean, run_var, momentum);
      auto [eq_scale, eq_shift, saved_mean, saved_invstd, next_mean, next_var] =
          g.bn_finalize(sum, sq_sum, gamma, beta, eps, count, attrs);
      mark_output(eq_scale, kEqScale, f32);
      mark_output(eq_shift, kEqShift, f32);
      mark_output(saved_mean, kSavedMean, f32);
      mark_output(saved_invstd, kSavedInvStd, f32);
      mark_output(next_mean, kRunMeanOut, f32);
      mark_output(next_var, kRunVarOut, f32);
      break;
    }
    case Pattern::kWgrad: {
      TensorPtr x = g.tensor(big_tensor("x", kX, s.x, io));
      auto dy = g.tensor(big_tensor("dy", kDY, s.y, io));
      if (s.prologue) x = bn_relu_prologue(g, x, c, io);
      auto dw = g.conv_wgrad(dy, x, conv_attributes<fe::graph::Conv_wgrad_attributes>("wgrad", s));
      mark_output(dw, kDW, io);
      dw->set_dim(vec(s.w.dim)).set_stride(vec(s.w.stride));
      break;
    }
    case Pattern::kDgrad: {
      auto dy = g.tensor(big_tensor("dy", kDY, s.y, io));
      auto w = g.tensor(big_tensor("w", kW, s.w, io));
      auto dx = g.conv_dgrad(dy, w, conv_attributes<fe::graph::Conv_dgrad_attributes>("dgrad", s));
      dx->set_dim(vec(s.x.dim)).set_stride(vec(s.x.stride));
      if (!s.prologue) {
        mark_output(dx, kDX, io);
        break;
      }
      // g = dx * (x * scale + shift > 0), then the previous BN's backward sums of g:
      // dbias = sum(g), dscale = sum(g * (x - mean) * invstd).
      auto x = g.tensor(big_tensor("x", kX, s.x, io));
      auto scale = g.tensor(channel_tensor("scale_in", kScale, c, f32));
      auto shift = g.tensor(channel_tensor("shift_in", kShift, c, f32));
      auto pre = g.pointwise(x, scale, pw("pre_scale", fe::PointwiseMode_t::MUL));
      pre = g.pointwise(pre, shift, pw("pre_shift", fe::PointwiseMode_t::ADD));
      auto grad = g.pointwise(dx, pre, pw("drelu", fe::PointwiseMode_t::RELU_BWD));
      mark_output(grad, kDX, io);
      auto mean = g.tensor(channel_tensor("mean_in", kMean, c, f32));
      auto invstd = g.tensor(channel_tensor("invstd_in", kInvStd, c, f32));
      auto [dscale, dbias, eq_dy, eq_x, eq_bias] =
          g.dbn_weight(grad, x, mean, invstd, scale, fe::graph::DBN_weight_attributes().set_name("dbn_weight"));
      mark_output(dscale, kDScale, f32);
      mark_output(dbias, kDBias, f32);
      mark_output(eq_dy, kEqScaleDy, f32);
      mark_output(eq_x, kEqScaleX, f32);
      mark_output(eq_bias, kEqBias, f32);
      break;
    }
  }
}

Status classify(const std::string& stage, const fe::error_t& e) {
  const std::string& msg = e.err_msg;
  if (msg.find("RUNTIME_PREREQUISITE_MISSING") != std::string::npos) return Status::kNeedsRuntimeCompilation;
  // The frontend's validate() checks less than the backend, which rejects malformed graphs
  // (e.g. channels not divisible by the filter's) with BAD_PARAM when it builds them.
  if (stage == "validate" || msg.find("CUDNN_STATUS_BAD_PARAM") != std::string::npos) return Status::kInvalid;
  if (e.code == fe::error_code_t::GRAPH_NOT_SUPPORTED || msg.find("NOT_SUPPORTED") != std::string::npos ||
      msg.find("No valid engine") != std::string::npos || stage == "create_execution_plans" ||
      stage == "check_support" || stage == "build_plans")
    return Status::kUnsupported;
  return Status::kError;
}

// validate -> operation graph -> heuristics (A, then fallback) -> check_support -> plans.
// `handle` null: deviceless, with the graph's device properties.
PlanResult build(const GraphSpec& s, fe::graph::Graph& g, cudnnHandle_t handle, fe::BuildPlanPolicy_t policy) {
  PlanResult r;
  std::string stage = "validate";
  auto failed = [&](const fe::error_t& e) {
    r.status = classify(stage, e);
    r.stage = stage;
    r.message = e.err_msg;
    return r;
  };
  try {
    define(s, g);
    if (auto e = g.validate(); e.is_bad()) return failed(e);
    r.validated = true;
    stage = "build_operation_graph";
    if (auto e = handle ? g.build_operation_graph(handle) : g.build_operation_graph(); e.is_bad()) return failed(e);
    stage = "create_execution_plans";
    if (auto e = g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}); e.is_bad()) return failed(e);
    if (s.dtype == DType::kFloat && !s.allow_tf32) g.deselect_numeric_notes({fe::NumericalNote_t::TENSOR_CORE});
    stage = "check_support";
    if (auto e = g.check_support(); e.is_bad()) return failed(e);
    stage = "build_plans";
    if (auto e = g.build_plans(policy); e.is_bad()) return failed(e);
    stage = "get_workspace_size";
    if (auto e = g.get_workspace_size(r.workspace); e.is_bad()) return failed(e);
  } catch (const std::exception& ex) {
    r.status = Status::kError;
    r.stage = stage;
    r.message = ex.what();
    return r;
  }
  r.num_plans = g.get_execution_plan_count();
  r.status = Status::kPlanned;
  r.stage.clear();
  return r;
}

struct Entry {
  std::shared_ptr<fe::graph::Graph> graph;
  PlanResult result;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Entry>> cache;
std::atomic<uint64_t> next_graph_id{1};
std::unordered_map<std::string, std::shared_ptr<fe::DeviceProperties>> device_properties;

// The cached entry for `key`, built by `make` on a miss. Building holds the lock: graphs are
// built once per key, and concurrent first calls of one key must not build twice.
template <typename Make>
PlanResult lookup(const std::string& key, Make&& make, std::shared_ptr<Entry>* entry_out = nullptr) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  bool hit = it != cache.end();
  if (!hit) {
    auto entry = std::make_shared<Entry>();
    entry->graph = std::make_shared<fe::graph::Graph>();
    entry->result = make(*entry->graph);
    entry->result.graph_id = next_graph_id++;
    it = cache.emplace(key, std::move(entry)).first;
  }
  if (entry_out) *entry_out = it->second;
  PlanResult r = it->second->result;
  r.cache_hit = hit;
  return r;
}

PlanResult load_error_result() {
  PlanResult r;
  r.status = Status::kError;
  r.stage = "load";
  r.message = load_cudnn();
  return r;
}

// One handle per (thread, device), created on the device current when first asked for.
cudnnHandle_t handle_for(int device) {
  thread_local std::unordered_map<int, cudnnHandle_t> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cudnnHandle_t h = nullptr;
  if (fe::detail::create_handle(&h) != CUDNN_STATUS_SUCCESS) return nullptr;
  handles.emplace(device, h);
  return h;
}

std::string device_key(const GraphSpec& spec, int device) {
  // The arch is part of the key; asked once per device.
  static std::array<std::atomic<int>, 64> sm_of{};
  int sm = device >= 0 && device < 64 ? sm_of[device].load() : 0;
  if (sm == 0) {
    int major = 0, minor = 0;
    fe::detail::cuda_device_get_attribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    fe::detail::cuda_device_get_attribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    sm = major * 10 + minor;
    if (device >= 0 && device < 64) sm_of[device] = sm;
  }
  return spec_key(spec) + "|device=" + std::to_string(device) + "|sm=" + std::to_string(sm);
}

PlanResult prepare_entry(const GraphSpec& spec, int device, std::shared_ptr<Entry>* entry) {
  if (!load_cudnn().empty()) return load_error_result();
  return lookup(device_key(spec, device), [&](fe::graph::Graph& g) {
    cudnnHandle_t h = handle_for(device);
    if (h == nullptr) {
      PlanResult r;
      r.stage = "cudnnCreate";
      r.message = "cudnnCreate failed (no usable CUDA device?)";
      return r;
    }
    // The heuristics' first choice that builds: the steady state runs one plan.
    return build(spec, g, h, fe::BuildPlanPolicy_t::HEURISTICS_CHOICE);
  }, entry);
}

}  // namespace

const char* pattern_name(Pattern p) {
  switch (p) {
    case Pattern::kConvBnAct: return "conv_bn_act";
    case Pattern::kConvBnStats: return "conv_bn_stats";
    case Pattern::kBnFinalize: return "bn_finalize";
    case Pattern::kWgrad: return "wgrad";
    case Pattern::kDgrad: return "dgrad";
  }
  return "?";
}

const char* status_name(Status s) {
  switch (s) {
    case Status::kPlanned: return "planned";
    case Status::kNeedsRuntimeCompilation: return "needs_runtime_compilation";
    case Status::kUnsupported: return "unsupported";
    case Status::kInvalid: return "invalid";
    case Status::kError: return "error";
  }
  return "?";
}

std::string spec_key(const GraphSpec& s) {
  std::ostringstream k;
  auto desc = [&](const char* name, const TensorDesc& d) {
    k << '|' << name;
    for (int i = 0; i < 4; ++i) k << ',' << d.dim[i];
    for (int i = 0; i < 4; ++i) k << ',' << d.stride[i];
  };
  k << pattern_name(s.pattern) << "|dtype=" << static_cast<int>(s.dtype) << "|prologue=" << s.prologue
    << "|residual=" << s.residual << "|relu=" << s.relu << "|tf32=" << (s.dtype == DType::kFloat && s.allow_tf32)
    << "|channels=" << s.channels;
  desc("x", s.x);
  desc("w", s.w);
  desc("y", s.y);
  if (s.residual) desc("r", s.residual_desc);
  k << "|conv=" << s.conv_stride[0] << ',' << s.conv_stride[1] << ',' << s.padding[0] << ',' << s.padding[1] << ','
    << s.dilation[0] << ',' << s.dilation[1];
  return k.str();
}

PlanResult plan_offline(const GraphSpec& spec, const std::string& props_json, int sm_version, int sm_count) {
  if (!load_cudnn().empty()) return load_error_result();
  const std::string key = spec_key(spec) + "|props=" + std::to_string(std::hash<std::string>{}(props_json)) +
                          "|sm=" + std::to_string(sm_version) + "|sm_count=" + std::to_string(sm_count);
  return lookup(key, [&](fe::graph::Graph& g) {
    std::shared_ptr<fe::DeviceProperties> props;
    {
      auto it = device_properties.find(props_json);
      if (it == device_properties.end()) {
        auto p = std::make_shared<fe::DeviceProperties>();
        if (auto e = p->deserialize(std::vector<uint8_t>(props_json.begin(), props_json.end())); e.is_bad()) {
          PlanResult r;
          r.stage = "device_properties";
          r.message = e.err_msg;
          return r;
        }
        it = device_properties.emplace(props_json, std::move(p)).first;
      }
      props = it->second;
    }
    g.set_device_properties(props).set_sm_version(sm_version).set_sm_count(sm_count);
    // ALL: count every plan cuDNN can build for this arch (the support table reports it).
    return build(spec, g, nullptr, fe::BuildPlanPolicy_t::ALL);
  });
}

PlanResult prepare(const GraphSpec& spec, int device) { return prepare_entry(spec, device, nullptr); }

PlanResult execute(const GraphSpec& spec, int device, void* stream, void* const* ptrs, void* workspace) {
  std::shared_ptr<Entry> entry;
  PlanResult r = prepare_entry(spec, device, &entry);
  if (r.status != Status::kPlanned) return r;
  cudnnHandle_t h = handle_for(device);
  if (fe::detail::set_stream(h, static_cast<cudaStream_t>(stream)) != CUDNN_STATUS_SUCCESS) {
    r.status = Status::kError;
    r.stage = "cudnnSetStream";
    r.message = "cudnnSetStream failed";
    return r;
  }
  std::unordered_map<fe::graph::Tensor_attributes::uid_t, void*> pack;
  for (int slot = 0; slot < kNumSlots; ++slot) {
    if (ptrs[slot] != nullptr) pack.emplace(slot + 1, ptrs[slot]);
  }
  if (auto e = entry->graph->execute(h, pack, workspace); e.is_bad()) {
    r.status = Status::kError;
    r.stage = "execute";
    r.message = e.err_msg;
  }
  return r;
}

std::string runtime_info() {
  std::ostringstream s;
  s << "cudnn-frontend " << CUDNN_FRONTEND_MAJOR_VERSION << '.' << CUDNN_FRONTEND_MINOR_VERSION << '.'
    << CUDNN_FRONTEND_PATCH_VERSION << ", built against cuDNN " << CUDNN_VERSION;
  const std::string& err = load_cudnn();
  if (err.empty()) {
    s << ", runtime cuDNN " << fe::detail::get_backend_version();
  } else {
    s << ", " << err;
  }
  return s.str();
}

int64_t cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(cache.size());
}

TensorDesc nhwc_desc(int64_t n, int64_t c, int64_t h, int64_t w) {
  TensorDesc d;
  const int64_t dim[4] = {n, c, h, w}, stride[4] = {c * h * w, 1, w * c, c};
  for (int i = 0; i < 4; ++i) {
    d.dim[i] = dim[i];
    d.stride[i] = stride[i];
  }
  return d;
}

TensorDesc conv_output_nhwc(const GraphSpec& s) {
  int64_t out[2];
  for (int i = 0; i < 2; ++i) {
    out[i] = (s.x.dim[2 + i] + 2 * s.padding[i] - s.dilation[i] * (s.w.dim[2 + i] - 1) - 1) / s.conv_stride[i] + 1;
  }
  return nhwc_desc(s.x.dim[0], s.w.dim[0], out[0], out[1]);
}

namespace {

using nlohmann::json;

int64_t write_out(const std::string& text, char* out, int64_t capacity) {
  if (capacity > 0) {
    const size_t n = std::min<size_t>(text.size(), static_cast<size_t>(capacity - 1));
    std::copy_n(text.data(), n, out);
    out[n] = '\0';
  }
  return static_cast<int64_t>(text.size());
}

template <size_t N>
void read_array(const json& j, const char* name, int64_t (&a)[N]) {
  if (!j.contains(name)) return;
  const auto& v = j.at(name);
  if (!v.is_array() || v.size() != N) {
    throw std::invalid_argument(std::string(name) + " must be a list of " + std::to_string(N));
  }
  for (size_t i = 0; i < N; ++i) a[i] = v.at(i).get<int64_t>();
}

// A TensorDesc from {"dim": [4], "stride": [4]}; stride defaults to dense channels_last.
bool read_desc(const json& j, const char* name, TensorDesc& d) {
  if (!j.contains(name)) return false;
  const auto& t = j.at(name);
  read_array(t, "dim", d.dim);
  d.stride[0] = 0;
  read_array(t, "stride", d.stride);
  if (d.stride[0] == 0) d = nhwc_desc(d.dim[0], d.dim[1], d.dim[2], d.dim[3]);
  return true;
}

GraphSpec spec_from_json(const json& j) {
  static const std::unordered_map<std::string, Pattern> patterns = {
      {"conv_bn_act", Pattern::kConvBnAct}, {"conv_bn_stats", Pattern::kConvBnStats},
      {"bn_finalize", Pattern::kBnFinalize}, {"wgrad", Pattern::kWgrad}, {"dgrad", Pattern::kDgrad}};
  static const std::unordered_map<std::string, DType> dtypes = {
      {"float16", DType::kHalf}, {"bfloat16", DType::kBFloat16}, {"float32", DType::kFloat}};
  GraphSpec s;
  const auto pattern = j.at("pattern").get<std::string>();
  if (!patterns.count(pattern)) throw std::invalid_argument("unknown pattern " + pattern);
  s.pattern = patterns.at(pattern);
  const auto dtype = j.at("dtype").get<std::string>();
  if (!dtypes.count(dtype)) throw std::invalid_argument("dtype must be float16, bfloat16 or float32, got " + dtype);
  s.dtype = dtypes.at(dtype);
  s.prologue = j.value("prologue", false);
  s.residual = j.value("residual", false);
  s.relu = j.value("relu", true);
  s.allow_tf32 = j.value("allow_tf32", false);
  s.channels = j.value("channels", int64_t{0});
  read_array(j, "conv_stride", s.conv_stride);
  read_array(j, "padding", s.padding);
  read_array(j, "dilation", s.dilation);
  if (s.pattern != Pattern::kBnFinalize) {
    if (!read_desc(j, "x", s.x) || !read_desc(j, "w", s.w)) throw std::invalid_argument(pattern + " needs x and w");
    if (!read_desc(j, "y", s.y)) s.y = conv_output_nhwc(s);
    if (s.residual && !read_desc(j, "residual_desc", s.residual_desc)) s.residual_desc = s.y;
  }
  return s;
}

json result_json(const PlanResult& r, const std::string& key) {
  return json{{"status", status_name(r.status)}, {"validated", r.validated}, {"num_plans", r.num_plans},
              {"workspace", r.workspace}, {"stage", r.stage}, {"message", r.message},
              {"graph_id", r.graph_id}, {"cache_hit", r.cache_hit}, {"key", key}};
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int64_t fusedres_cudnn_plan_json(const char* request, char* out,
                                                                                   int64_t capacity) {
  try {
    const json j = json::parse(request);
    const GraphSpec spec = spec_from_json(j);
    PlanResult r;
    if (j.contains("device_properties")) {
      r = plan_offline(spec, j.at("device_properties").get<std::string>(), j.at("sm_version").get<int>(),
                       j.at("sm_count").get<int>());
    } else {
      r = prepare(spec, j.at("device").get<int>());
    }
    return write_out(result_json(r, spec_key(spec)).dump(), out, capacity);
  } catch (const std::exception& e) {
    write_out(std::string("bad cudnn plan request: ") + e.what(), out, capacity);
    return -1;
  }
}

extern "C" __attribute__((visibility("default"))) int64_t fusedres_cudnn_runtime_info(char* out, int64_t capacity) {
  return write_out(runtime_info(), out, capacity);
}

extern "C" __attribute__((visibility("default"))) int64_t fusedres_cudnn_cache_size() { return cache_size(); }

}  // namespace fusedres::cudnn_graphs
