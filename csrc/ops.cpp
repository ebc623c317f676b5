// Schemas of every fusedres op, declared once. Kernels attach per device with
// TORCH_LIBRARY_IMPL in csrc/<op>/; fake (meta) impls live in fusedres/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

#ifndef FUSEDRES_WITH_CUDA
#define FUSEDRES_WITH_CUDA 0
#endif

TORCH_LIBRARY(fusedres, m) {
  m.def(
      "conv_bn_act(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
      "int residual_stride=1) -> Tensor");
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor out, Tensor? scale, bool relu) "
      "-> (Tensor grad_conv, Tensor grad_shift)");
  // Train mode (fusedres/ops/_ref.py has the math of each).
  m.def(
      "conv_bn_stats(Tensor x, Tensor weight, Tensor? scale_in, Tensor? shift_in, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor y, Tensor mean, Tensor m2)");
  m.def(
      "bn_finalize(Tensor mean, Tensor m2, int count, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps) "
      "-> (Tensor scale, Tensor shift, Tensor invstd)");
  m.def(
      "bn_add_act(Tensor y, Tensor scale, Tensor shift, Tensor? shortcut, Tensor? shortcut_scale, "
      "Tensor? shortcut_shift, int shortcut_stride, bool relu) -> Tensor");
  m.def(
      "bn_backward_reduce(Tensor grad, Tensor y, Tensor mean, Tensor invstd, Tensor? act_out, "
      "Tensor? act_scale, Tensor? act_shift) -> (Tensor sum_g, Tensor sum_g_xhat)");
  m.def(
      "bn_backward_elemt(Tensor grad, Tensor y, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor sum_g, Tensor sum_g_xhat, int count, Tensor? act_out, Tensor? act_scale, "
      "Tensor? act_shift) -> Tensor");
  m.def(
      "conv_bn_backward(Tensor grad, Tensor? grad_y, Tensor? grad_coef, Tensor x, Tensor weight, "
      "Tensor? scale_in, Tensor? shift_in, Tensor? mean_in, Tensor? invstd_in, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[2] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor sum_g, Tensor sum_g_xhat)");
  // Eval 3x3 stride-1 convs as Winograd F(2x2, 3x3) on the CPU (csrc/winograd/; weight transform
  // and fake impls in fusedres/ops/winograd.py). The `_` variant writes into the residual it reads
  // and returns nothing (torch.compile cannot functionalize a custom op that returns an alias).
  m.def(
      "winograd_conv_act(Tensor x, Tensor weight_t, Tensor bias, Tensor? residual, bool relu) "
      "-> Tensor");
  m.def(
      "winograd_conv_act_(Tensor(a!) residual, Tensor x, Tensor weight_t, Tensor bias, bool relu) "
      "-> ()");
  // The `cudnn` backend: the ops above as cuDNN graphs (same schemas and math; CUDA kernels in
  // fusedres._cudnn_C, csrc/cudnn/; fake impls in fusedres/ops/cudnn.py).
  m.def(
      "conv_bn_act_cudnn(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
      "int residual_stride=1) -> Tensor");
  m.def(
      "conv_bn_stats_cudnn(Tensor x, Tensor weight, Tensor? scale_in, Tensor? shift_in, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor y, Tensor mean, Tensor m2)");
  m.def(
      "bn_finalize_cudnn(Tensor mean, Tensor m2, int count, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps) "
      "-> (Tensor scale, Tensor shift, Tensor invstd)");
  m.def(
      "conv_bn_backward_cudnn(Tensor grad, Tensor? grad_y, Tensor? grad_coef, Tensor x, Tensor weight, "
      "Tensor? scale_in, Tensor? shift_in, Tensor? mean_in, Tensor? invstd_in, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[2] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor sum_g, Tensor sum_g_xhat)");
}

// `import fusedres._C` loads the library above; the module itself only reports how it was built.
static PyModuleDef fusedres_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fusedres_c_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "with_cuda", FUSEDRES_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
