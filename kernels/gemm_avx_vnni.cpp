// AVX-VNNI: the VEX-encoded 256-bit vpdpbusd of CPUs without AVX-512 (16 ymm registers).
// Compiled with -mavx2 -mavxvnni; reached only after cpu_supports(avx_vnni).
#include <immintrin.h>

#include "tile_impl.h"

namespace tidal {
namespace {

struct AvxVnni {
    // One 16-column panel is two ymm: 6 rows x 2 = 12 accumulators + 2 weights + 1 broadcast.
    static constexpr int kMR = 6, kNV = 1;

    template <int MR, int NV>
    static void kernel(const MicroCall& k) {
        static_assert(NV == 1);
        __m256i acc[MR][2];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                const int32_t* from = k.accumulate ? k.c + r * kTileCols + h * 8 : k.init + h * 8;
                acc[r][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
            }
        const int8_t* b = k.b;
        const uint8_t* a = k.a;
        for (int64_t g = 0; g < k.kg; ++g, b += k.group_bytes, a += 4) {
            const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
            const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32));
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                const __m256i x = _mm256_set1_epi32(load_i32(a + r * k.lda));
                acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], x, w0);
                acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], x, w1);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(k.c + r * kTileCols + h * 8), acc[r][h]);
    }
};

}  // namespace

void tile_avx_vnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* scratch) {
    run_tile<AvxVnni>(g, m0, m1, p0, p1, scratch);
}

int64_t peak_loop_avx_vnni(int64_t iterations) {
    volatile int32_t seed = 0x01020304;
    const __m256i x = _mm256_set1_epi32(seed), w = _mm256_set1_epi32(seed + 1);
    __m256i c0 = x, c1 = x, c2 = x, c3 = x, c4 = x, c5 = x, c6 = w, c7 = w, c8 = w, c9 = w, c10 = w, c11 = w;
    for (int64_t it = 0; it < iterations; ++it) {
        __asm__ volatile(
            "%{vex%} vpdpbusd %[w], %[x], %[c0]\n\t%{vex%} vpdpbusd %[w], %[x], %[c1]\n\t"
            "%{vex%} vpdpbusd %[w], %[x], %[c2]\n\t%{vex%} vpdpbusd %[w], %[x], %[c3]\n\t"
            "%{vex%} vpdpbusd %[w], %[x], %[c4]\n\t%{vex%} vpdpbusd %[w], %[x], %[c5]\n\t"
            "%{vex%} vpdpbusd %[w], %[x], %[c6]\n\t%{vex%} vpdpbusd %[w], %[x], %[c7]\n\t"
            "%{vex%} vpdpbusd %[w], %[x], %[c8]\n\t%{vex%} vpdpbusd %[w], %[x], %[c9]\n\t"
            "%{vex%} vpdpbusd %[w], %[x], %[c10]\n\t%{vex%} vpdpbusd %[w], %[x], %[c11]"
            : [c0] "+x"(c0), [c1] "+x"(c1), [c2] "+x"(c2), [c3] "+x"(c3), [c4] "+x"(c4), [c5] "+x"(c5),
              [c6] "+x"(c6), [c7] "+x"(c7), [c8] "+x"(c8), [c9] "+x"(c9), [c10] "+x"(c10), [c11] "+x"(c11)
            : [x] "x"(x), [w] "x"(w));
    }
    const __m256i sum = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
        _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)),
                         _mm256_add_epi32(_mm256_add_epi32(c8, c9), _mm256_add_epi32(c10, c11))));
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
    volatile int32_t sink = lanes[0];
    (void)sink;
    return iterations * 12 * 32 * 2;
}

}  // namespace tidal
