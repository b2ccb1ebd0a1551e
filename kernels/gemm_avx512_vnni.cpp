// AVX-512 VNNI: one vpdpbusd does 64 u8 x s8 multiply-adds into 16 int32 lanes.
// Compiled with -mavx512f -mavx512bw -mavx512vnni; reached only after cpu_supports(avx512_vnni).
#include <immintrin.h>

#include "tile_impl.h"

namespace tidal {
namespace {

struct Avx512Vnni {
    // 6 rows x 4 panels = 24 zmm accumulators + 4 weight vectors + 1 broadcast of the 32 registers.
    static constexpr int kMR = 6, kNV = 4;

    template <int MR, int NV>
    static void kernel(const MicroCall& k) {
        __m512i acc[MR][NV];
        if (k.accumulate) {
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_si512(k.c + r * kTileCols + v * 16);
        } else {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
                const __m512i init = _mm512_loadu_si512(k.init + v * 16);
#pragma GCC unroll 8
                for (int r = 0; r < MR; ++r) acc[r][v] = init;
            }
        }
        const int8_t* b = k.b;
        const uint8_t* a = k.a;
        for (int64_t g = 0; g < k.kg; ++g, b += NV * 64, a += 4) {
            __m512i w[NV];  // NV panels side by side: one sequential stream
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(b + v * 64);
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                const __m512i x = _mm512_set1_epi32(load_i32(a + r * k.lda));
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], x, w[v]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) _mm512_storeu_si512(k.c + r * kTileCols + v * 16, acc[r][v]);
    }
};

}  // namespace

static_assert(Avx512Vnni::kNV == panel_group(Isa::avx512_vnni));

void tile_avx512_vnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* scratch) {
    run_tile<Avx512Vnni>(g, m0, m1, p0, p1, scratch);
}

int64_t peak_loop_avx512_vnni(int64_t iterations) {
    // 12 independent chains hide the latency; written in asm so the compiler adds no register moves.
    volatile int32_t seed = 0x01020304;
    const __m512i x = _mm512_set1_epi32(seed), w = _mm512_set1_epi32(seed + 1);
    __m512i c0 = x, c1 = x, c2 = x, c3 = x, c4 = x, c5 = x, c6 = w, c7 = w, c8 = w, c9 = w, c10 = w, c11 = w;
    for (int64_t it = 0; it < iterations; ++it) {
        __asm__ volatile(
            "vpdpbusd %[w], %[x], %[c0]\n\tvpdpbusd %[w], %[x], %[c1]\n\tvpdpbusd %[w], %[x], %[c2]\n\t"
            "vpdpbusd %[w], %[x], %[c3]\n\tvpdpbusd %[w], %[x], %[c4]\n\tvpdpbusd %[w], %[x], %[c5]\n\t"
            "vpdpbusd %[w], %[x], %[c6]\n\tvpdpbusd %[w], %[x], %[c7]\n\tvpdpbusd %[w], %[x], %[c8]\n\t"
            "vpdpbusd %[w], %[x], %[c9]\n\tvpdpbusd %[w], %[x], %[c10]\n\tvpdpbusd %[w], %[x], %[c11]"
            : [c0] "+v"(c0), [c1] "+v"(c1), [c2] "+v"(c2), [c3] "+v"(c3), [c4] "+v"(c4), [c5] "+v"(c5),
              [c6] "+v"(c6), [c7] "+v"(c7), [c8] "+v"(c8), [c9] "+v"(c9), [c10] "+v"(c10), [c11] "+v"(c11)
            : [x] "v"(x), [w] "v"(w));
    }
    const __m512i sum = _mm512_add_epi32(
        _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
        _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)),
                         _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11))));
    alignas(64) int32_t lanes[16];
    _mm512_store_si512(lanes, sum);
    volatile int32_t sink = lanes[0];
    (void)sink;
    return iterations * 12 * 64 * 2;
}

}  // namespace tidal
