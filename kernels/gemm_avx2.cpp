// AVX2: vpmaddubsw multiplies u8 x s8 pairs into saturating int16, vpmaddwd sums pairs into int32.
// A pair of products reaches 2 * 255 * 64 = 32640 at most when every weight lies in [-64, 64], so the
// packer splits wider weights into two such halves (block_bytes 128) and the sum stays exact.
// Compiled with -mavx2 -mfma.
#include <immintrin.h>

#include "tile_impl.h"

namespace tidal {
namespace {

inline __m256i dot4(__m256i x, __m256i w, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), ones);
}

template <bool Split>
struct Avx2 {
    // 4 rows x 2 ymm = 8 accumulators, leaving registers for weights, the broadcast and the products.
    static constexpr int kMR = 4, kNV = 1;

    template <int MR, int NV>
    static void kernel(const MicroCall& k) {
        static_assert(NV == 1);
        const __m256i ones = _mm256_set1_epi16(1);
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
                acc[r][0] = _mm256_add_epi32(acc[r][0], dot4(x, w0, ones));
                acc[r][1] = _mm256_add_epi32(acc[r][1], dot4(x, w1, ones));
            }
            if constexpr (Split) {
                const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64));
                const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 96));
#pragma GCC unroll 8
                for (int r = 0; r < MR; ++r) {
                    const __m256i x = _mm256_set1_epi32(load_i32(a + r * k.lda));
                    acc[r][0] = _mm256_add_epi32(acc[r][0], dot4(x, v0, ones));
                    acc[r][1] = _mm256_add_epi32(acc[r][1], dot4(x, v1, ones));
                }
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

void tile_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* scratch) {
    if (g.block_bytes == 128) {
        run_tile<Avx2<true>>(g, m0, m1, p0, p1, scratch);
    } else {
        run_tile<Avx2<false>>(g, m0, m1, p0, p1, scratch);
    }
}

}  // namespace tidal
