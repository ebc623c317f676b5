// extern "C" entry points for the tests (ctypes): fill the launchers' argument structs from flat
// arguments and call the real launchers of csrc/**/*_cuda.cu. Returns their cudaError_t.
#include <cstdint>

#include "fusedres/cuda_launchers.h"

using namespace fusedres;
using namespace fusedres::cuda;

namespace {

// N, H, W, C, K, R, S, P, Q, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups
ConvGeometry geometry(const int64_t* g) {
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13],
          g[14], g[15]};
}

// P, Q, H, W, C, stride
ShortcutGeometry shortcut_geometry(const int64_t* s) {
  return s == nullptr ? ShortcutGeometry{} : ShortcutGeometry{s[0], s[1], s[2], s[3], s[4], s[5]};
}

DType dtype(int d) { return static_cast<DType>(d); }

}  // namespace

extern "C" {

int emu_conv_bn_act(const int64_t* geom, int dt, const void* x, const void* weight,
                    const float* scale, const float* shift, const void* residual,
                    const int64_t* residual_geom, void* out, int relu, int allow_tf32) {
  ConvBnActArgs a{};
  a.geom = geometry(geom);
  a.dtype = dtype(dt);
  a.x = x;
  a.weight = weight;
  a.scale = scale;
  a.shift = shift;
  a.residual = residual;
  a.residual_geom = shortcut_geometry(residual_geom);
  a.out = out;
  a.relu = relu != 0;
  a.allow_tf32 = allow_tf32 != 0;
  return launch_conv_bn_act(a, nullptr);
}

int64_t emu_conv_bn_stats_num_partials(const int64_t* geom) {
  return conv_bn_stats_num_partials(geometry(geom));
}

int emu_conv_bn_stats(const int64_t* geom, int dt, const void* x, const void* weight,
                      const float* scale_in, const float* shift_in, void* y, float* mean,
                      float* m2, float* workspace, int allow_tf32) {
  ConvBnStatsArgs a{};
  a.geom = geometry(geom);
  a.dtype = dtype(dt);
  a.x = x;
  a.weight = weight;
  a.scale_in = scale_in;
  a.shift_in = shift_in;
  a.y = y;
  a.mean = mean;
  a.m2 = m2;
  a.workspace = workspace;
  a.allow_tf32 = allow_tf32 != 0;
  return launch_conv_bn_stats(a, nullptr);
}

int emu_bn_finalize(int64_t channels, int64_t count, const float* mean, const float* m2,
                    const float* weight, const float* bias, void* running_mean,
                    void* running_var, int running_dtype, float momentum, float eps,
                    float* scale, float* shift, float* invstd) {
  BnFinalizeArgs a{};
  a.channels = channels;
  a.count = count;
  a.mean = mean;
  a.m2 = m2;
  a.weight = weight;
  a.bias = bias;
  a.running_mean = running_mean;
  a.running_var = running_var;
  a.running_dtype = dtype(running_dtype);
  a.momentum = momentum;
  a.eps = eps;
  a.scale = scale;
  a.shift = shift;
  a.invstd = invstd;
  return launch_bn_finalize(a, nullptr);
}

int emu_bn_add_act(int64_t rows, int64_t channels, int dt, const void* y, const float* scale,
                   const float* shift, const void* shortcut, const int64_t* shortcut_geom,
                   const float* shortcut_scale, const float* shortcut_shift, void* out,
                   int relu) {
  BnAddActArgs a{};
  a.rows = rows;
  a.channels = channels;
  a.dtype = dtype(dt);
  a.y = y;
  a.scale = scale;
  a.shift = shift;
  a.shortcut = shortcut;
  a.shortcut_geom = shortcut_geometry(shortcut_geom);
  a.shortcut_scale = shortcut_scale;
  a.shortcut_shift = shortcut_shift;
  a.out = out;
  a.relu = relu != 0;
  return launch_bn_add_act(a, nullptr);
}

int64_t emu_bn_act_backward_num_partials(int64_t rows) { return bn_act_backward_num_partials(rows); }

int emu_bn_act_backward(int64_t rows, int64_t channels, int dt, const void* grad_out,
                        const void* out, const float* scale, void* grad_conv, float* grad_shift,
                        float* workspace, int relu) {
  BnActBackwardArgs a{};
  a.rows = rows;
  a.channels = channels;
  a.dtype = dtype(dt);
  a.grad_out = grad_out;
  a.out = out;
  a.scale = scale;
  a.grad_conv = grad_conv;
  a.grad_shift = grad_shift;
  a.workspace = workspace;
  a.relu = relu != 0;
  return launch_bn_act_backward(a, nullptr);
}

int64_t emu_bn_backward_num_partials(int64_t rows) { return bn_backward_num_partials(rows); }

int emu_bn_backward_reduce(int64_t rows, int64_t channels, int dt, const void* grad,
                           const void* y, const float* mean, const float* invstd,
                           const void* act_out, const float* act_scale, const float* act_shift,
                           float* sum_g, float* sum_g_xhat, float* workspace) {
  BnBackwardReduceArgs a{};
  a.rows = rows;
  a.channels = channels;
  a.dtype = dtype(dt);
  a.grad = grad;
  a.y = y;
  a.mean = mean;
  a.invstd = invstd;
  a.mask = {act_out, act_scale, act_shift};
  a.sum_g = sum_g;
  a.sum_g_xhat = sum_g_xhat;
  a.workspace = workspace;
  return launch_bn_backward_reduce(a, nullptr);
}

int emu_bn_backward_elemt(int64_t rows, int64_t channels, int dt, const void* grad,
                          const void* y, const float* mean, const float* invstd,
                          const float* weight, const float* sum_g, const float* sum_g_xhat,
                          int64_t count, const void* act_out, const float* act_scale,
                          const float* act_shift, void* grad_input) {
  BnBackwardElemtArgs a{};
  a.rows = rows;
  a.channels = channels;
  a.dtype = dtype(dt);
  a.grad = grad;
  a.y = y;
  a.mean = mean;
  a.invstd = invstd;
  a.weight = weight;
  a.sum_g = sum_g;
  a.sum_g_xhat = sum_g_xhat;
  a.count = count;
  a.mask = {act_out, act_scale, act_shift};
  a.grad_input = grad_input;
  return launch_bn_backward_elemt(a, nullptr);
}

int64_t emu_conv_bn_backward_workspace_floats(const int64_t* geom, int with_sums,
                                              int need_weight) {
  return conv_bn_backward_workspace_floats(geometry(geom), with_sums != 0, need_weight != 0);
}

int emu_conv_bn_backward(const int64_t* geom, int dt, const void* grad, const void* grad_y,
                         const float* grad_coef, const void* x, const void* weight,
                         const float* scale_in, const float* shift_in, const float* mean_in,
                         const float* invstd_in, void* grad_input, void* grad_weight,
                         float* sum_g, float* sum_g_xhat, float* workspace, int allow_tf32) {
  ConvBnBackwardArgs a{};
  a.geom = geometry(geom);
  a.dtype = dtype(dt);
  a.grad = grad;
  a.grad_y = grad_y;
  a.grad_coef = grad_coef;
  a.x = x;
  a.weight = weight;
  a.scale_in = scale_in;
  a.shift_in = shift_in;
  a.mean_in = mean_in;
  a.invstd_in = invstd_in;
  a.grad_input = grad_input;
  a.grad_weight = grad_weight;
  a.sum_g = sum_g;
  a.sum_g_xhat = sum_g_xhat;
  a.workspace = workspace;
  a.allow_tf32 = allow_tf32 != 0;
  return launch_conv_bn_backward(a, nullptr);
}

}  // extern "C"
