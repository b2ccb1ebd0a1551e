"""The CUDA int8 GEMM is compiled whenever a CUDA toolkit is present, and is optional otherwise.

Running it needs a GPU: perf/gpu_int8_check.py checks it against numpy and times it on one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tidal import _kernels


def _has_nvcc() -> bool:
    # Where CMake's check_language(CUDA) looks first: PATH, then the default toolkit prefix.
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def test_built_when_nvcc_is_present() -> None:
    if not _has_nvcc():
        pytest.skip("no CUDA toolkit on this machine; the module is built without CUDA")
    assert _kernels.HAS_CUDA


@pytest.mark.skipif(not _kernels.HAS_CUDA, reason="built without CUDA")
def test_host_arrays_are_refused() -> None:
    a = np.ones((4, 8), np.int8)
    with pytest.raises(TypeError):
        _kernels.cuda_gemm_s8(a, a, np.zeros((4, 4), np.int32))


@pytest.mark.skipif(not _kernels.HAS_CUDA, reason="built without CUDA")
def test_device_query_never_fails() -> None:
    assert _kernels.cuda_device_sm() >= 0
