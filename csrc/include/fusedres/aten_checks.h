// Argument checks shared by the ops' CPU kernels and CUDA glue (.cpp only). Every message
// starts with the op and names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fusedres {

// The storage dtypes of the 'cuda' backend's activations.
inline void check_activation_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// `t` has the shape, dtype and device of `ref`.
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " does not match ", ref_name, " dtype ", ref.scalar_type());
  check_same_device(op, name, t, ref_name, ref);
}

// A per-channel vector of `size` values on `ref`'s device, returned as contiguous fp32, the type
// every kernel reads (undefined when absent).
inline at::Tensor per_channel_fp32(const char* op, const char* name,
                                   const std::optional<at::Tensor>& t, int64_t size,
                                   const char* ref_name, const at::Tensor& ref) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, op, ": ", name, " must have shape (", size,
              ",) (one value per channel), got ", t->sizes());
  check_same_device(op, name, *t, ref_name, ref);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name,
              " must be floating point, got ", t->scalar_type());
  return t->to(at::kFloat).contiguous();
}

inline void check_both_or_neither(const char* op, const char* first, const at::Tensor& a,
                                  const char* second, const at::Tensor& b) {
  TORCH_CHECK(a.defined() == b.defined(), op, ": ", first, " and ", second,
              " must be given together");
}

// Data pointer of an optional tensor, nullptr when it is undefined.
template <typename T>
const T* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
inline const void* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

}  // namespace fusedres
