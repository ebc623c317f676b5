// Per-element math of the fused ops, written once for the CPU and CUDA kernels.
//
// conv_bn_act epilogue:   out = act(acc * scale + shift + residual)
// bn_add_act:             out = act(y * scale + shift + shortcut)   (bn_act with the shortcut)
// conv prologue:          in  = relu(x * scale + shift)             (the previous BN+ReLU)
// bn_act_backward:        g   = grad_out * act'(out);  grad_conv = g * scale
// Train-mode BatchNorm statistics, finalize and backward live in batchnorm.h.
#pragma once

#include "fusedres/macros.h"

namespace fusedres {

// `scale`/`shift`/`residual` are already resolved to 1/0/0 by the caller when absent, so the
// kernels carry no branches for optional operands in the inner loop.
template <bool kRelu>
FUSEDRES_HD float bn_act(float acc, float scale, float shift, float residual) {
  const float y = acc * scale + shift + residual;
  if constexpr (kRelu) {
    // `y > 0 ? y : 0` would turn NaN into 0; keep NaN propagating as torch.relu does.
    return y < 0.f ? 0.f : y;
  }
  return y;
}

// The previous layer's BN+ReLU, applied to a conv input element as it is loaded. Padding is not
// passed through it: a padding tap is a zero of the activated tensor.
FUSEDRES_HD float bn_relu(float x, float scale, float shift) {
  const float y = x * scale + shift;
  return y < 0.f ? 0.f : y;
}

// Gradient through the activation, given the saved *output* of the forward op: for ReLU the
// output is positive exactly where the pre-activation was.
template <bool kRelu>
FUSEDRES_HD float act_grad(float grad_out, float out) {
  if constexpr (kRelu) {
    return out > 0.f ? grad_out : 0.f;
  }
  return grad_out;
}

}  // namespace fusedres
