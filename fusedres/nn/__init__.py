"""Drop-in fused modules."""

from fusedres.nn.blocks import BasicBlock, Bottleneck, PlainBlock, ShortcutA
from fusedres.nn.convert import convert

__all__ = ["BasicBlock", "Bottleneck", "PlainBlock", "ShortcutA", "convert"]
