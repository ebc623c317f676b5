"""Registered fused ops (torch.ops.fusedres.*) and their differentiable Python entry points."""

from fusedres.ops import bn_add_act, bn_backward, bn_finalize, conv_bn_backward, conv_bn_stats  # noqa: F401 (registration)
from fusedres.ops.bn_act_backward import bn_act_backward
from fusedres.ops.bn_fold import fold_conv_bn
from fusedres.ops.conv_bn_act import conv_bn_act
from fusedres.ops import cudnn  # noqa: F401,E402 (loads fusedres._cudnn_C; the cudnn ops' fake impls)
from fusedres.ops import winograd  # noqa: F401,E402 (the Winograd ops' fake impls)

__all__ = ["bn_act_backward", "conv_bn_act", "fold_conv_bn"]
