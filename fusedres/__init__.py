"""fusedres: ResNet's conv -> BatchNorm -> ReLU (+ residual) chains fused into single kernel launches.

    import fusedres, torchvision
    model = fusedres.convert(torchvision.models.resnet50()).eval()

See README.md for the API, the backends and the benchmarks.
"""

from fusedres import _extension
from fusedres.backends import BACKENDS, default_backend, get_default_backend, set_default_backend
from fusedres.nn import BasicBlock, Bottleneck, convert
from fusedres.ops import conv_bn_act
from fusedres import models

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BasicBlock",
    "Bottleneck",
    "conv_bn_act",
    "convert",
    "default_backend",
    "get_default_backend",
    "set_default_backend",
]
