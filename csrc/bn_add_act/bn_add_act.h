// ATen-side helpers of bn_add_act shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "fusedres/conv_geometry.h"

namespace fusedres {

// Operands after validation: activations channels_last, per-channel vectors fp32 (the shortcut's
// undefined when absent), and where each output element reads its shortcut.
struct BnAddActOperands {
  at::Tensor y;
  at::Tensor scale;
  at::Tensor shift;
  at::Tensor shortcut;
  at::Tensor shortcut_scale;
  at::Tensor shortcut_shift;
  ShortcutGeometry shortcut_geom;
  int64_t rows;      // N * P * Q
  int64_t channels;  // K
};

BnAddActOperands prepare_bn_add_act(const at::Tensor& y, const at::Tensor& scale,
                                    const at::Tensor& shift,
                                    const std::optional<at::Tensor>& shortcut,
                                    const std::optional<at::Tensor>& shortcut_scale,
                                    const std::optional<at::Tensor>& shortcut_shift,
                                    int64_t shortcut_stride);

}  // namespace fusedres
