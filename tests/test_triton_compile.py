"""The Triton conv kernels compile for sm_90 (Triton's compiler and ptxas, no GPU needed).

On a GPU the test suite runs the kernels for real; without one they run under the interpreter,
which is no proof that the GPU compiler takes them. See tests/compile_triton_kernels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedres import backends


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real in the other tests")
@pytest.mark.skipif(not backends._triton_importable(), reason="triton is not installed")
def test_triton_conv_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.compile_triton_kernels"], cwd=Path(__file__).parents[1],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sum(line.startswith("ok ") for line in result.stdout.splitlines()) == 16, result.stdout
