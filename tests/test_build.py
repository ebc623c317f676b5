"""Where the build was asked for every part (FUSEDRES_BUILD_CUDA=1 and FUSEDRES_BUILD_CUDNN=1, as CI
does), a missing part is a failure here rather than a quiet skip of the tests that need it."""

from __future__ import annotations

import os

import pytest

from fusedres import _extension
from fusedres.ops import cudnn
from tests.cuda_emulator import build as emulator_build

pytestmark = pytest.mark.skipif(os.environ.get("FUSEDRES_BUILD_CUDA") != "1",
                                reason="FUSEDRES_BUILD_CUDA=1 not set: the build may leave parts out")


def test_native_extension_has_its_cuda_kernels():
    assert _extension.loaded(), _extension.LOAD_ERROR
    assert _extension.with_cuda_kernels(), _extension.cuda_build_note()


@pytest.mark.skipif(os.environ.get("FUSEDRES_BUILD_CUDNN") != "1", reason="FUSEDRES_BUILD_CUDNN=1 not set")
def test_cudnn_backend_is_built():
    assert cudnn.loaded(), cudnn.LOAD_ERROR


def test_cuda_emulator_finds_the_toolkit_headers():
    assert emulator_build.cuda_include() is not None, "no CUDA toolkit headers: the emulated tests would skip"
