// Per-element and per-channel math of train-mode BatchNorm, written once for the CPU and CUDA
// kernels (fusedres/ops/_ref.py "train mode" is the spec):
//
//   statistics  (count, mean, m2 = sum((y - mean)^2)) per channel, partials merged with Chan
//   finalize    invstd = 1/sqrt(m2/count + eps), scale = weight*invstd, shift = bias - mean*scale
//   backward    g = grad masked by the following ReLU, xhat = (y - mean) * invstd,
//               dy = weight*invstd * (g - sum(g)/count - xhat * sum(g*xhat)/count)
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedres/macros.h"

namespace fusedres {

// Statistics of `count` values: their mean and m2 = sum((v - mean)^2). Carrying m2 instead of
// sum(v^2) keeps the variance exact when |mean| >> std, where E[v^2] - E[v]^2 cancels. The CUDA
// kernels accumulate in float; the CPU kernels in double, as ATen's CPU BatchNorm does.
template <typename Acc>
struct MeanM2 {
  int64_t count;
  Acc mean;
  Acc m2;
};

// Chan, Golub & LeVeque's pairwise merge of two partials; `a` may be empty (count 0).
template <typename Acc>
FUSEDRES_HD MeanM2<Acc> chan_merge(const MeanM2<Acc>& a, const MeanM2<Acc>& b) {
  if (b.count == 0) return a;
  const int64_t count = a.count + b.count;
  const Acc delta = b.mean - a.mean;
  const Acc b_share = static_cast<Acc>(b.count) / static_cast<Acc>(count);
  return {count, a.mean + delta * b_share,
          a.m2 + b.m2 + delta * delta * static_cast<Acc>(a.count) * b_share};
}

// bn_finalize for one channel: BatchNorm's normalisation with the batch statistics as an affine
// map y * scale + shift. `weight`/`bias` are 1/0 when BatchNorm has no affine parameters.
struct BnChannelAffine {
  float scale;
  float shift;
  float invstd;
};

FUSEDRES_HD BnChannelAffine bn_batch_affine(float mean, float m2, int64_t count, float weight,
                                            float bias, float eps) {
  // Normalisation uses the biased variance, as nn.BatchNorm2d does in training.
  const float invstd = 1.f / sqrtf(m2 / static_cast<float>(count) + eps);
  const float scale = weight * invstd;
  return {scale, bias - mean * scale, invstd};
}

// The running variance takes the unbiased estimate m2 / (count - 1).
FUSEDRES_HD float unbiased_variance(float m2, int64_t count) {
  return m2 / static_cast<float>(count > 1 ? count - 1 : 1);
}

// running <- (1 - momentum) * running + momentum * batch, as nn.BatchNorm2d updates its buffers.
FUSEDRES_HD float running_stat_update(float running, float batch, float momentum) {
  return running * (1.f - momentum) + batch * momentum;
}

// bn_add_act's shortcut value before it is added: the block input (scale 1, shift 0) or the raw
// projection conv output through its own BatchNorm.
FUSEDRES_HD float shortcut_value(float shortcut, float scale, float shift) {
  return shortcut * scale + shift;
}

// Where the ReLU mask of BN backward comes from: none (no ReLU followed the BN), the saved
// post-ReLU output (positive exactly where the ReLU passed), or the pre-activation recomputed
// from the raw conv output y as y * act_scale + act_shift (the next conv's prologue).
enum class ReluMask : int { kNone, kFromOutput, kFromPrologue };

template <ReluMask kMask>
FUSEDRES_HD float relu_masked_grad(float grad, float y, float act_out, float act_scale,
                                   float act_shift) {
  if constexpr (kMask == ReluMask::kFromOutput) {
    return act_out > 0.f ? grad : 0.f;
  } else if constexpr (kMask == ReluMask::kFromPrologue) {
    return y * act_scale + act_shift > 0.f ? grad : 0.f;
  } else {
    return grad;
  }
}

// bn_backward_elemt's per-channel constants, so the per-element formula is one subtract-multiply
// chain: dy = grad_scale * (g - mean_g - (y - mean) * xhat_coef). conv_bn_backward's grad_coef
// holds them as its four rows, in field order (_ref.bn_backward_coef).
struct BnBackwardChannel {
  float mean;
  float grad_scale;  // weight * invstd
  float mean_g;      // sum(g) / count
  float xhat_coef;   // invstd * sum(g * xhat) / count
};

// `inv_count` = 1 / count, computed once by the caller.
FUSEDRES_HD BnBackwardChannel bn_backward_channel(float mean, float invstd, float weight,
                                                  float sum_g, float sum_g_xhat, float inv_count) {
  return {mean, weight * invstd, sum_g * inv_count, invstd * sum_g_xhat * inv_count};
}

FUSEDRES_HD float bn_backward_elem(float g, float y, const BnBackwardChannel& c) {
  return c.grad_scale * (g - c.mean_g - (y - c.mean) * c.xhat_coef);
}

}  // namespace fusedres
