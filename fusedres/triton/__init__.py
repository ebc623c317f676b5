"""Triton kernels of fusedres (implicit-GEMM conv with fused epilogue, BN backward elementwise).

Each submodule holds one op's kernel and its launcher; they import ``triton`` when first
imported, so importing this package costs nothing. The registered ops in ``fusedres.ops``
import the launchers, e.g. ``from fusedres.triton.conv_bn_act import conv_bn_act``.
Run them on the CPU by setting ``TRITON_INTERPRET=1`` before importing triton.
"""
