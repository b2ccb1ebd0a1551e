"""Bad input into tidal._kernels raises a Python error and never reaches a kernel (no crash, no SIGILL)."""

from __future__ import annotations

import numpy as np
import pytest

from tidal import _kernels


@pytest.fixture(scope="module")
def weights() -> _kernels.PackedWeights:
    return _kernels.PackedWeights(np.ones((12, 5), np.int8))


def test_packed_weights_describe_themselves(weights: _kernels.PackedWeights) -> None:
    assert (weights.k, weights.n, weights.isa) == (12, 5, _kernels.best_isa())
    assert weights.nbytes >= 12 * 5
    assert repr(weights) == f"PackedWeights(k=12, n=5, isa='{_kernels.best_isa()}')"


@pytest.mark.parametrize(
    "a",
    [
        np.ones((3, 12), np.float64),  # wrong dtype is never cast silently
        np.ones((3, 12), np.int8),
        np.ones(12, np.uint8),  # wrong rank
        np.ones((3, 24), np.uint8)[:, ::2],  # not contiguous
        [[1] * 12],
    ],
    ids=["float64", "int8", "1-d", "strided", "list"],
)
def test_wrong_activation_type_raises_type_error(weights: _kernels.PackedWeights, a: object) -> None:
    with pytest.raises(TypeError):
        _kernels.gemm_s32(a, weights)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: _kernels.gemm_s32(np.ones((2, 11), np.uint8), w), "K = 12"),
        (lambda w: _kernels.gemm_s32(np.ones((2, 12), np.uint8), w, a_zero_point=256), "a_zero_point"),
        (lambda w: _kernels.gemm_s32(np.ones((2, 12), np.uint8), w, threads=-1), "threads"),
        (lambda w: _kernels.gemm_f32(np.ones((2, 12), np.uint8), w, np.ones(4, np.float32)), "scale"),
        (lambda w: _kernels.gemm_f32(np.ones((2, 12), np.uint8), w, np.ones(5, np.float32),
                                     bias=np.ones(6, np.float32)), "bias"),
        (lambda w: _kernels.gemm_f32(np.ones((2, 12), np.uint8), w, np.ones(5, np.float32), mid=(0.0, 3)), "mid"),
        (lambda w: _kernels.gemm_u8(np.ones((2, 12), np.uint8), w, np.ones(5, np.float32), float("nan"), 0),
         "out_scale"),
        (lambda w: _kernels.gemm_u8(np.ones((2, 12), np.uint8), w, np.ones(5, np.float32), 0.1, -1),
         "out_zero_point"),
    ],
    ids=["k-mismatch", "a-zero-point", "threads", "scale-length", "bias-length", "mid-scale", "out-scale",
         "out-zero-point"],
)
def test_bad_values_raise_value_error(weights: _kernels.PackedWeights, call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(weights)


def test_wrong_scale_dtype_raises_type_error(weights: _kernels.PackedWeights) -> None:
    with pytest.raises(TypeError):
        _kernels.gemm_f32(np.ones((2, 12), np.uint8), weights, np.ones(5, np.float64))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weights": np.ones((4, 4), np.float32)}, TypeError, None),
        ({"weights": np.ones((0, 4), np.int8)}, ValueError, "empty"),
        ({"weights": np.ones((16385, 1), np.int8)}, ValueError, "16384"),
        ({"weights": np.ones((4, 4), np.int8), "zero_points": np.zeros(3, np.int32)}, ValueError, "per column"),
        ({"weights": np.ones((4, 4), np.int8), "zero_points": np.full(4, 200, np.int32)}, ValueError, "-128"),
        ({"weights": np.ones((4, 4), np.int8), "zero_points": np.zeros(4, np.int64)}, TypeError, None),
        ({"weights": np.ones((4, 4), np.int8), "isa": "sse9"}, ValueError, "unknown isa"),
    ],
    ids=["float-weights", "empty", "k-too-large", "zp-length", "zp-range", "zp-dtype", "unknown-isa"],
)
def test_bad_weights_are_refused(kwargs: dict, error: type[Exception], message: str | None) -> None:
    with pytest.raises(error, match=message):
        _kernels.PackedWeights(**kwargs)


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx_vnni", "avx2"])
def test_isa_this_cpu_lacks_is_refused_not_executed(isa: str) -> None:
    if isa in _kernels.isas():
        pytest.skip(f"this CPU runs {isa}")
    with pytest.raises(ValueError, match="cannot execute"):
        _kernels.PackedWeights(np.ones((4, 4), np.int8), isa=isa)


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        _kernels.quantize_u8(np.ones((2, 3), np.float64), 0.1, 0)
    with pytest.raises(ValueError, match="scale"):
        _kernels.quantize_u8(np.ones((2, 3), np.float32), 0.0, 0)
    with pytest.raises(ValueError, match="zero_point"):
        _kernels.quantize_u8(np.ones((2, 3), np.float32), 0.1, 300)


def test_peak_gops_for_every_simd_isa_this_cpu_runs() -> None:
    with pytest.raises(ValueError):
        _kernels.peak_gops("scalar")
    for isa in _kernels.isas()[:-1]:
        assert _kernels.peak_gops(isa, 0.01) > 0
