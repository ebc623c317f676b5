"""Drop-in fused modules."""

from fusedres.nn.blocks import BasicBlock, Bottleneck
from fusedres.nn.convert import convert

__all__ = ["BasicBlock", "Bottleneck", "convert"]
