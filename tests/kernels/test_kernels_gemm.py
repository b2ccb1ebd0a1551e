"""The int8 GEMM against a numpy int64 / float32 reference, on every dispatch path this CPU runs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tidal import _kernels

# Every dispatch path, forced in turn; the ones this CPU cannot execute are skipped, never run.
ISAS = [
    pytest.param(name, marks=pytest.mark.skipif(name not in _kernels.isas(), reason=f"this CPU lacks {name}"))
    for name in ("avx512_vnni", "avx_vnni", "avx2", "scalar")
]
each_isa = pytest.mark.parametrize("isa", ISAS)


def _operands(m: int, k: int, n: int, seed: int, weight_zp: bool):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    zb = rng.integers(-128, 128, n, dtype=np.int32) if weight_zp else np.zeros(n, np.int32)
    return a, b, zb


def _reference_s32(a: np.ndarray, b: np.ndarray, za: int, zb: np.ndarray) -> np.ndarray:
    return (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb.astype(np.int64))


SHAPES = dict(
    m=st.integers(1, 40),
    k=st.one_of(st.integers(1, 80), st.integers(500, 1100)),  # the second range crosses K cache blocks
    n=st.integers(1, 150),
    za=st.integers(0, 255),
    weight_zp=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)


@each_isa
@settings(max_examples=40, deadline=None)
@given(**SHAPES)
@example(m=1, k=3, n=1, za=0, weight_zp=False, seed=0)
@example(m=1, k=1023, n=17, za=255, weight_zp=True, seed=1)
@example(m=7, k=6, n=33, za=128, weight_zp=False, seed=2)
def test_s32_matches_int64_reference(isa: str, m: int, k: int, n: int, za: int, weight_zp: bool, seed: int) -> None:
    a, b, zb = _operands(m, k, n, seed, weight_zp)
    w = _kernels.PackedWeights(b, zb if weight_zp else None, isa=isa)
    assert w.isa == isa
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w, za), _reference_s32(a, b, za, zb))


@each_isa
@pytest.mark.parametrize("fill", [-128, 127, 64, -64])
def test_extreme_weights_do_not_saturate(isa: str, fill: int) -> None:
    # All-255 activations against extreme weights are the worst case for vpmaddubsw's int16 pair sums.
    a = np.full((5, 64), 255, np.uint8)
    b = np.full((64, 20), fill, np.int8)
    w = _kernels.PackedWeights(b, isa=isa)
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w), _reference_s32(a, b, 0, np.zeros(20, np.int32)))


def _saturating_s32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What a u8 x s8 kernel computes when it adds each pair of products in saturating int16 (vpmaddubsw used
    on full 8-bit weights, as MLAS's AVX2 path does): the result tidal's kernels must never produce."""
    products = a.astype(np.int64)[:, :, None] * b.astype(np.int64)[None]
    if products.shape[1] % 2:
        products = np.concatenate([products, np.zeros_like(products[:, :1])], axis=1)
    return np.clip(products[:, 0::2] + products[:, 1::2], -32768, 32767).sum(axis=1)


@each_isa
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), k=st.integers(2, 300), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_exact_where_saturating_pairs_are_not(isa: str, m: int, k: int, n: int, seed: int) -> None:
    # Bright activations against large same-signed weights: many pairs exceed int16, so the check below
    # proves the inputs would expose a saturating kernel, and the kernel must still equal the int64 sums.
    rng = np.random.default_rng(seed)
    a = rng.integers(192, 256, (m, k), dtype=np.uint8)
    b = (rng.integers(96, 128, (k, n)) * rng.choice([-1, 1], n)).astype(np.int8)
    exact = _reference_s32(a, b, 0, np.zeros(n, np.int32))
    assert (_saturating_s32(a, b) != exact).any()
    np.testing.assert_array_equal(_kernels.gemm_s32(a, _kernels.PackedWeights(b, isa=isa)), exact)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), k=st.integers(1, 300), n=st.integers(1, 40), wide=st.booleans(),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_avx2_takes_its_fast_path_only_for_seven_bit_weights(m: int, k: int, n: int, wide: bool, seed: int) -> None:
    # 7-bit weights (what `tidal optimize` makes on hosts without VNNI) run on vpmaddubsw, whose pair sums
    # cannot saturate there; one weight beyond [-64, 64] moves the whole matrix to the widened path.
    if "avx2" not in _kernels.isas():
        pytest.skip("this CPU lacks avx2")
    rng = np.random.default_rng(seed)
    a = rng.integers(192, 256, (m, k), dtype=np.uint8)
    b = rng.integers(-64, 65, (k, n), dtype=np.int8)
    if wide:
        b[rng.integers(k), rng.integers(n)] = rng.choice([-128, 65, 127])
    w = _kernels.PackedWeights(b, isa="avx2")
    assert w.widened == wide
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w, 7), _reference_s32(a, b, 7, np.zeros(n, np.int32)))


@pytest.mark.parametrize("weight_zp, za", [(True, 200), (False, 200), (False, 0)])
def test_avx2_large_eight_bit_weights_stay_int8_in_memory(weight_zp: bool, za: int) -> None:
    # From 2^23 weights on, the widened path keeps them int8 (half the bytes to stream) and sign-extends them
    # in the micro-kernel; K crosses its 256-group blocks unevenly, N ends in a partial panel, M in short
    # row blocks, with bright activations and extreme weights. Symmetric weights with za = 0 take the
    # micro-kernel's direct int32 store; zero points go through the epilogue.
    if "avx2" not in _kernels.isas():
        pytest.skip("this CPU lacks avx2")
    rng = np.random.default_rng(5)
    k, n = 2050, 4097
    a = rng.integers(192, 256, (7, k), dtype=np.uint8)
    b = rng.choice(np.array([-128, -127, -1, 0, 1, 126, 127], np.int8), (k, n))
    zb = rng.integers(-128, 128, n, dtype=np.int32) if weight_zp else np.zeros(n, np.int32)
    w = _kernels.PackedWeights(b, zb if weight_zp else None, isa="avx2")
    small = _kernels.PackedWeights(np.ascontiguousarray(b[:, :1024]), zb[:1024], isa="avx2")
    assert w.widened and small.widened
    assert w.nbytes == 64 * ((k + 3) // 4) * ((n + 15) // 16) and small.nbytes == 128 * ((k + 3) // 4) * 64
    ref = _reference_s32(a, b, za, zb)
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w, za, threads=1), ref)
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w, za, threads=0), ref)


@pytest.mark.parametrize("m", [7, 16])
@pytest.mark.parametrize("k, n", [(1000, 500), (2050, 1040)])
@pytest.mark.parametrize("za", [0, 131])
def test_avx2_seven_bit_path_across_blocks_and_loop_orders(m: int, k: int, n: int, za: int) -> None:
    # 1000 x 500: one K block of weights within 512 KiB, so row blocks go outermost; 2050 x 1040: several K
    # blocks (the last one short), weights beyond 512 KiB, later row blocks prefetching the next K block, and
    # (za = 0) the int32 store from the last K block. Extreme 7-bit weights against bright activations.
    if "avx2" not in _kernels.isas():
        pytest.skip("this CPU lacks avx2")
    rng = np.random.default_rng(m * k + za)
    a = rng.integers(192, 256, (m, k), dtype=np.uint8)
    b = rng.choice(np.array([-64, -63, -1, 0, 1, 63, 64], np.int8), (k, n))
    w = _kernels.PackedWeights(b, isa="avx2")
    assert not w.widened
    ref = _reference_s32(a, b, za, np.zeros(n, np.int32))
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w, za, threads=1), ref)
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w, za, threads=0), ref)


@each_isa
def test_transposed_packing_matches(isa: str) -> None:
    a, b, _ = _operands(9, 70, 45, 3, False)
    plain = _kernels.gemm_s32(a, _kernels.PackedWeights(b, isa=isa))
    transposed = _kernels.gemm_s32(a, _kernels.PackedWeights(np.ascontiguousarray(b.T), isa=isa, transposed=True))
    np.testing.assert_array_equal(plain, transposed)


@each_isa
@pytest.mark.parametrize(("m", "k", "n"), [(256, 256, 256), (8, 1024, 1024), (3, 40, 16)])
def test_threaded_split_matches(isa: str, m: int, k: int, n: int) -> None:
    # Row split, column-panel split, and a product too small to wake the pool.
    a, b, zb = _operands(m, k, n, 4, True)
    w = _kernels.PackedWeights(b, zb, isa=isa)
    ref = _reference_s32(a, b, 9, zb)
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w, 9, threads=0), ref)
    np.testing.assert_array_equal(_kernels.gemm_s32(a, w, 9, threads=1), ref)


@each_isa
def test_empty_batch(isa: str) -> None:
    w = _kernels.PackedWeights(np.ones((8, 5), np.int8), isa=isa)
    assert _kernels.gemm_s32(np.zeros((0, 8), np.uint8), w).shape == (0, 5)


def _reference_epilogue(acc, scale, bias, relu, mid, out):
    """The kernel's float32 order of operations, one rounding per step."""
    f32 = np.float32
    v = acc.astype(f32) * scale
    if mid is not None:
        ms, mz = f32(mid[0]), f32(mid[1])
        v = (np.clip(np.rint(v * (f32(1) / ms)) + mz, 0, 255) - mz) * ms
    if bias is not None:
        v = v + bias
    if relu:
        v = np.maximum(v, f32(0))
    if out is None:
        return v
    return np.clip(np.rint(v * (f32(1) / f32(out[0]))) + f32(out[1]), 0, 255).astype(np.uint8)


@each_isa
@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 20), k=st.integers(1, 200), n=st.integers(1, 70), za=st.integers(0, 255),
    with_bias=st.booleans(), relu=st.booleans(), with_mid=st.booleans(), seed=st.integers(0, 2**32 - 1),
)
def test_epilogue_matches_float32_reference(
    isa: str, m: int, k: int, n: int, za: int, with_bias: bool, relu: bool, with_mid: bool, seed: int
) -> None:
    a, b, zb = _operands(m, k, n, seed, True)
    rng = np.random.default_rng(seed)
    w = _kernels.PackedWeights(b, zb, isa=isa)
    scale = rng.uniform(1e-5, 1e-3, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    mid = (float(rng.uniform(0.01, 0.2)), int(rng.integers(0, 256))) if with_mid else None
    out = (float(rng.uniform(0.01, 0.2)), int(rng.integers(0, 256)))
    acc = _reference_s32(a, b, za, zb)

    got_f = _kernels.gemm_f32(a, w, scale, za, bias=bias, relu=relu, mid=mid)
    np.testing.assert_array_equal(got_f, _reference_epilogue(acc, scale, bias, relu, mid, None))
    got_q = _kernels.gemm_u8(a, w, scale, out[0], out[1], za, bias=bias, relu=relu, mid=mid)
    np.testing.assert_array_equal(got_q, _reference_epilogue(acc, scale, bias, relu, mid, out))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(1, 70), zp=st.integers(0, 255), seed=st.integers(0, 2**32 - 1))
def test_quantize_matches_onnx_quantizelinear(rows: int, cols: int, zp: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 4).astype(np.float32)
    x.flat[::7] = np.float32(0.5) * np.float32(0.25)  # exact ties exercise round-half-to-even
    scale = np.float32(0.25)
    expected = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(_kernels.quantize_u8(x, float(scale), zp), expected)


def test_quantize_saturates_infinities() -> None:
    x = np.array([[np.inf, -np.inf, 1e30, -1e30]], np.float32)
    np.testing.assert_array_equal(_kernels.quantize_u8(x, 0.1, 3), [[255, 0, 255, 0]])


def test_best_isa_is_the_fastest_runnable() -> None:
    runnable = _kernels.isas()
    assert runnable[-1] == "scalar"
    assert _kernels.best_isa() == runnable[0]


def test_concurrent_callers_share_the_pool_safely() -> None:
    # Model instances run on their own threads; a caller that finds the pool busy computes inline.
    a, b, zb = _operands(128, 512, 256, 6, False)
    w = _kernels.PackedWeights(b)
    expected = _reference_s32(a, b, 1, zb)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: _kernels.gemm_s32(a, w, 1), range(16)))
    for got in results:
        np.testing.assert_array_equal(got, expected)
