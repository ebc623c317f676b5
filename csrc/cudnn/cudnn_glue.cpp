// The `cudnn` backend's ATen glue: tensors in, cudnn_graphs.h's plain structs out (no frontend
// header here: see cudnn_graphs.cpp). Registers the CUDA kernels of the fusedres::*_cudnn ops
// declared in csrc/ops.cpp. A case cuDNN does not offer raises an error starting with
// kNotOffered; fusedres/ops/cudnn.py turns it into a one-time warning and the next backend.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "cudnn/cudnn_graphs.h"

namespace fusedres::cudnn_glue {
namespace {
namespace cg = fusedres::cudnn_graphs;

// Keep in sync with fusedres/ops/cudnn.py (NOT_OFFERED).
constexpr const char* kNotOffered = "fusedres cudnn: not offered:";

using Ptrs = std::array<void*, cg::kNumSlots>;

cg::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cg::DType::kHalf;
    case at::kBFloat16: return cg::DType::kBFloat16;
    case at::kFloat: return cg::DType::kFloat;
    default:
      TORCH_CHECK(false, kNotOffered, " dtype ", t.scalar_type(), " (the graphs take float16, bfloat16, float32)");
  }
}

cg::TensorDesc desc_of(const at::Tensor& t) {
  cg::TensorDesc d;
  for (int i = 0; i < 4; ++i) {
    d.dim[i] = t.size(i);
    d.stride[i] = t.stride(i);
  }
  return d;
}

void* ptr(const at::Tensor& t) { return const_cast<void*>(t.const_data_ptr()); }

// channels_last and 16-byte aligned, as the fused engines read them (a no-op for the usual input).
at::Tensor nhwc(const at::Tensor& t) {
  at::Tensor c = t.contiguous(at::MemoryFormat::ChannelsLast);
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::ChannelsLast);
  return c;
}

// A per-channel vector in `type`, or `fill` where the operand is absent.
at::Tensor channel_vec(const std::optional<at::Tensor>& t, int64_t k, double fill, at::ScalarType type,
                       const at::Tensor& like) {
  if (t.has_value()) return t->to(type).contiguous();
  return at::full({k}, fill, like.options().dtype(type));
}

at::Tensor channel_stats(int64_t k, const at::Tensor& like) { return at::empty({k}, like.options().dtype(at::kFloat)); }

void set_conv(cg::GraphSpec& s, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
              int64_t groups) {
  TORCH_CHECK(groups == 1, kNotOffered, " groups=", groups, " (the graphs here are dense convolutions)");
  for (int i = 0; i < 2; ++i) {
    s.conv_stride[i] = stride[i];
    s.padding[i] = padding[i];
    s.dilation[i] = dilation[i];
  }
}

std::string first_line(const std::string& m) { return m.substr(0, m.find('\n')); }

// Plans (first call of a spec), then runs on the current stream with a workspace from the
// caching allocator: no host synchronization.
void run(const cg::GraphSpec& spec, const Ptrs& ptrs, const at::Tensor& like) {
  const int device = like.get_device();
  cg::PlanResult r = cg::prepare(spec, device);
  TORCH_CHECK(r.status == cg::Status::kPlanned, kNotOffered, " ", cg::pattern_name(spec.pattern), " (",
              cg::status_name(r.status), " at ", r.stage, "): ", first_line(r.message));
  at::Tensor workspace = at::empty({std::max<int64_t>(r.workspace, 1)}, like.options().dtype(at::kByte));
  r = cg::execute(spec, device, c10::cuda::getCurrentCUDAStream(device).stream(), ptrs.data(), ptr(workspace));
  TORCH_CHECK(r.status == cg::Status::kPlanned, "fusedres cudnn: ", cg::pattern_name(spec.pattern), " failed at ",
              r.stage, ": ", r.message);
}

at::Tensor empty_nhwc(const cg::TensorDesc& d, const at::Tensor& like) {
  return at::empty({d.dim[0], d.dim[1], d.dim[2], d.dim[3]},
                   like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor conv_bn_act_cudnn(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             bool relu, int64_t residual_stride) {
  const c10::cuda::CUDAGuard guard(x.device());
  cg::GraphSpec s;
  s.pattern = cg::Pattern::kConvBnAct;
  s.dtype = dtype_of(x);
  s.relu = relu;
  s.allow_tf32 = at::globalContext().allowTF32CuDNN();
  set_conv(s, stride, padding, dilation, groups);
  const at::Tensor xc = nhwc(x), wc = nhwc(weight);
  s.x = desc_of(xc);
  s.w = desc_of(wc);
  s.y = cg::conv_output_nhwc(s);
  at::Tensor y = empty_nhwc(s.y, x);
  if (y.numel() == 0) return y;
  const int64_t k = weight.size(0);
  const at::Tensor sc = channel_vec(scale, k, 1.0, at::kFloat, x), sh = channel_vec(shift, k, 0.0, at::kFloat, x);
  at::Tensor rc;
  Ptrs p{};
  if (residual.has_value()) {
    TORCH_CHECK(residual_stride == 1 && residual->sizes() == y.sizes(), kNotOffered,
                " an option-A shortcut (strided or channel-extended residual)");
    rc = nhwc(*residual);
    s.residual = true;
    s.residual_desc = desc_of(rc);
    p[cg::kResidual] = ptr(rc);
  }
  p[cg::kX] = ptr(xc);
  p[cg::kW] = ptr(wc);
  p[cg::kScale] = ptr(sc);
  p[cg::kShift] = ptr(sh);
  p[cg::kY] = ptr(y);
  run(s, p, x);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_stats_cudnn(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale_in,
    const std::optional<at::Tensor>& shift_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  cg::GraphSpec s;
  s.pattern = cg::Pattern::kConvBnStats;
  s.dtype = dtype_of(x);
  s.prologue = scale_in.has_value();
  s.allow_tf32 = at::globalContext().allowTF32CuDNN();
  set_conv(s, stride, padding, dilation, groups);
  const at::Tensor xc = nhwc(x), wc = nhwc(weight);
  s.x = desc_of(xc);
  s.w = desc_of(wc);
  s.y = cg::conv_output_nhwc(s);
  const int64_t k = weight.size(0);
  at::Tensor y = empty_nhwc(s.y, x);
  at::Tensor sum = channel_stats(k, x), sq_sum = channel_stats(k, x);
  const int64_t count = s.y.dim[0] * s.y.dim[2] * s.y.dim[3];
  TORCH_CHECK(count > 0 && k > 0, kNotOffered, " an empty output");
  Ptrs p{};
  at::Tensor sc, sh;
  if (s.prologue) {
    // The pre-built engines take the prologue's scale/shift in the io dtype.
    sc = channel_vec(scale_in, x.size(1), 1.0, x.scalar_type(), x);
    sh = channel_vec(shift_in, x.size(1), 0.0, x.scalar_type(), x);
    p[cg::kScale] = ptr(sc);
    p[cg::kShift] = ptr(sh);
  }
  p[cg::kX] = ptr(xc);
  p[cg::kW] = ptr(wc);
  p[cg::kY] = ptr(y);
  p[cg::kSum] = ptr(sum);
  p[cg::kSqSum] = ptr(sq_sum);
  run(s, p, x);
  // genstats gives fp32 sum and sum of squares; m2 = sumsq - sum * mean loses digits when
  // |mean| >> std (the fused kernels merge Welford partials instead).
  at::Tensor mean = sum / static_cast<double>(count);
  at::Tensor m2 = (sq_sum - sum * mean).clamp_min_(0.0);
  return {y, mean, m2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_finalize_cudnn(
    const at::Tensor& mean, const at::Tensor& m2, int64_t count, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  const c10::cuda::CUDAGuard guard(mean.device());
  TORCH_CHECK(mean.scalar_type() == at::kFloat, kNotOffered, " statistics of dtype ", mean.scalar_type());
  const int64_t k = mean.numel();
  cg::GraphSpec s;
  s.pattern = cg::Pattern::kBnFinalize;
  s.dtype = cg::DType::kFloat;
  s.channels = k;
  // cuDNN's finalize takes sums; (mean, m2) -> (sum, sum of squares) is exact enough in fp32
  // only when |mean| is not >> std, like cuDNN's own variance.
  const at::Tensor sum = mean * static_cast<double>(count);
  const at::Tensor sq_sum = m2 + sum * mean;
  const at::Tensor gamma = channel_vec(weight, k, 1.0, at::kFloat, mean);
  const at::Tensor beta = channel_vec(bias, k, 0.0, at::kFloat, mean);
  const at::Tensor rm_in = channel_vec(running_mean, k, 0.0, at::kFloat, mean);
  const at::Tensor rv_in = channel_vec(running_var, k, 1.0, at::kFloat, mean);
  at::Tensor scale = channel_stats(k, mean), shift = channel_stats(k, mean), saved_mean = channel_stats(k, mean);
  at::Tensor invstd = channel_stats(k, mean), rm_out = channel_stats(k, mean), rv_out = channel_stats(k, mean);
  // Passed by value (host scalars read when the graph is launched).
  float eps_value = static_cast<float>(eps), momentum_value = static_cast<float>(momentum);
  int64_t count_value = count;
  Ptrs p{};
  p[cg::kSum] = ptr(sum);
  p[cg::kSqSum] = ptr(sq_sum);
  p[cg::kGamma] = ptr(gamma);
  p[cg::kBeta] = ptr(beta);
  p[cg::kRunMeanIn] = ptr(rm_in);
  p[cg::kRunVarIn] = ptr(rv_in);
  p[cg::kEps] = &eps_value;
  p[cg::kMomentum] = &momentum_value;
  p[cg::kCount] = &count_value;
  p[cg::kEqScale] = ptr(scale);
  p[cg::kEqShift] = ptr(shift);
  p[cg::kSavedMean] = ptr(saved_mean);
  p[cg::kSavedInvStd] = ptr(invstd);
  p[cg::kRunMeanOut] = ptr(rm_out);
  p[cg::kRunVarOut] = ptr(rv_out);
  run(s, p, mean);
  if (running_mean.has_value()) {
    running_mean->copy_(rm_out);
    running_var->copy_(rv_out);
  }
  return {scale, shift, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_backward_cudnn(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_coef,
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale_in,
    const std::optional<at::Tensor>& shift_in, const std::optional<at::Tensor>& mean_in,
    const std::optional<at::Tensor>& invstd_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  cg::GraphSpec base;
  base.dtype = dtype_of(x);
  base.allow_tf32 = at::globalContext().allowTF32CuDNN();
  base.prologue = scale_in.has_value();
  set_conv(base, stride, padding, dilation, groups);
  at::Tensor dy = grad;
  if (grad_coef.has_value()) {
    // This BN's backward applied to the incoming gradient (bn_grad_prologue in _ref.py): plain
    // ATen elementwise, as no cuDNN graph takes it as a dgrad/wgrad prologue.
    const at::Tensor coef = grad_coef->to(at::kFloat);
    auto row = [&](int64_t i) { return coef[i].view({1, -1, 1, 1}); };
    dy = (row(1) * (grad.to(at::kFloat) - row(2) - (grad_y->to(at::kFloat) - row(0)) * row(3))).to(grad.scalar_type());
  }
  const at::Tensor dyc = nhwc(dy), xc = nhwc(x), wc = nhwc(weight);
  base.x = desc_of(xc);
  base.w = desc_of(wc);
  base.y = desc_of(dyc);
  const int64_t c = x.size(1);
  at::Tensor grad_input = x.new_empty({0}), grad_weight = weight.new_empty({0});
  at::Tensor sum_g = x.new_empty({0}, x.options().dtype(at::kFloat)), sum_g_xhat = sum_g;
  if (output_mask[0]) {
    cg::GraphSpec s = base;
    s.pattern = cg::Pattern::kDgrad;
    grad_input = empty_nhwc(s.x, x);
    Ptrs p{};
    p[cg::kDY] = ptr(dyc);
    p[cg::kW] = ptr(wc);
    p[cg::kDX] = ptr(grad_input);
    at::Tensor sc, sh, mean, invstd, eq;
    if (s.prologue) {
      sc = channel_vec(scale_in, c, 1.0, at::kFloat, x);
      sh = channel_vec(shift_in, c, 0.0, at::kFloat, x);
      mean = channel_vec(mean_in, c, 0.0, at::kFloat, x);
      invstd = channel_vec(invstd_in, c, 1.0, at::kFloat, x);
      sum_g = channel_stats(c, x);
      sum_g_xhat = channel_stats(c, x);
      eq = at::empty({3, c}, x.options().dtype(at::kFloat));  // dBN coefficients we do not use
      p[cg::kX] = ptr(xc);
      p[cg::kScale] = ptr(sc);
      p[cg::kShift] = ptr(sh);
      p[cg::kMean] = ptr(mean);
      p[cg::kInvStd] = ptr(invstd);
      p[cg::kDBias] = ptr(sum_g);
      p[cg::kDScale] = ptr(sum_g_xhat);
      p[cg::kEqScaleDy] = ptr(eq[0]);
      p[cg::kEqScaleX] = ptr(eq[1]);
      p[cg::kEqBias] = ptr(eq[2]);
    }
    run(s, p, x);
  }
  if (output_mask[1]) {
    cg::GraphSpec s = base;
    s.pattern = cg::Pattern::kWgrad;
    at::Tensor dw = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::ChannelsLast));
    s.w = desc_of(dw);
    Ptrs p{};
    p[cg::kX] = ptr(xc);
    p[cg::kDY] = ptr(dyc);
    p[cg::kDW] = ptr(dw);
    at::Tensor sc, sh;
    if (s.prologue) {
      sc = channel_vec(scale_in, c, 1.0, x.scalar_type(), x);
      sh = channel_vec(shift_in, c, 0.0, x.scalar_type(), x);
      p[cg::kScale] = ptr(sc);
      p[cg::kShift] = ptr(sh);
    }
    run(s, p, x);
    grad_weight = dw.contiguous();
  }
  return {grad_input, grad_weight, sum_g, sum_g_xhat};
}

}  // namespace
}  // namespace fusedres::cudnn_glue

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("conv_bn_act_cudnn", &fusedres::cudnn_glue::conv_bn_act_cudnn);
  m.impl("conv_bn_stats_cudnn", &fusedres::cudnn_glue::conv_bn_stats_cudnn);
  m.impl("bn_finalize_cudnn", &fusedres::cudnn_glue::bn_finalize_cudnn);
  m.impl("conv_bn_backward_cudnn", &fusedres::cudnn_glue::conv_bn_backward_cudnn);
}

// `import fusedres._cudnn_C` registers the kernels above; planning without a GPU goes through
// the C functions of cudnn_graphs.h (ctypes), so the module itself is empty.
static PyModuleDef fusedres_cudnn_module = {PyModuleDef_HEAD_INIT, "_cudnn_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__cudnn_C(void) { return PyModule_Create(&fusedres_cudnn_module); }
