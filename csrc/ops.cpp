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
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor out, Tensor? scale, Tensor? conv_out, bool relu) "
      "-> (Tensor grad_conv, Tensor grad_shift, Tensor grad_scale)");
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
