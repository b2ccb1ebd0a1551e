// AVX2, two exact paths (see PackedWeights):
//  - 7-bit weights (|w| <= 64): vpmaddubsw multiplies u8 x s8 pairs into int16, which cannot saturate
//    (2 * 255 * 64 < 2^15), vpmaddwd with ones sums the pairs into int32: 3 instructions per 32 products.
//  - any 8-bit weights: int16 activations x int16 weights with vpmaddwd (exact in int32): 2 instructions
//    per 16 products, about 3/4 of the 7-bit path's rate; splitting weights into two 7-bit halves would
//    cost two full passes (1/2).
// Compiled with -mavx2 -mfma.
#include <immintrin.h>

#include "tile_impl.h"

namespace tidal {
namespace {

// Weights are prefetched this far ahead of the K group being multiplied (32 K groups at 64 bytes per group, 16
// on the 8-bit path's int16 copy). Without it the first row block of each K block waits on L2/L3 for every new line of the
// B micro-panel: wide layers whose weights outgrow L2 (4096 x 4096: 16 MiB) ran at 0.71x MLAS at M = 16.
// 2 KiB measured best of 0.5, 1, 2, 4 and 8 KiB; the hardware prefetchers alone fall behind. Panels, K blocks and the
// next panel follow one another in memory, so the line 2 KiB ahead is always the next one to be read
// (past the end it is a harmless hint).
constexpr int64_t kPrefetchBytes = 2048;

// Prefetch addresses run past the end of the packed weights on the last groups; they are formed as integers,
// since pointer arithmetic beyond an allocation is undefined even when nothing is dereferenced.
template <int Hint = _MM_HINT_T0>
inline void prefetch(const int8_t* p, std::ptrdiff_t ahead) {
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) + ahead),
                 static_cast<decltype(_MM_HINT_T0)>(Hint));  // an enum in GCC, an int in Clang
}

inline __m256i load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

template <int MR>
inline void load_acc(const MicroCall& k, __m256i (&acc)[MR][2]) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const int32_t* from = k.accumulate ? k.c + r * kTileCols + h * 8 : k.init + h * 8;
            acc[r][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
        }
}

template <int MR>
inline void store_rows(int32_t* to, int64_t ld, __m256i (&acc)[MR][2]) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + r * ld + h * 8), acc[r][h]);
}

// Two stores behind a branch: selecting the pointer and stride first made GCC 12 keep the accumulators on
// the stack through the whole K loop (20-30% slower).
template <int MR>
inline void store_acc(const MicroCall& k, __m256i (&acc)[MR][2]) {
    if (k.out != nullptr) {
        store_rows<MR>(k.out, k.ldo, acc);
    } else {
        store_rows<MR>(k.c, kTileCols, acc);
    }
}

// The micro-kernels are not inlined into run_tile: inlined there (once its loops became a lambda), GCC 12 ran
// out of general registers in the 8-bit path's 6-row loop and reloaded a pointer and the loop bound from the
// stack on every K group.
// The row steps are inline asm so that every accumulator stays in its own register. Written as intrinsics,
// GCC 12 copied each accumulator through a temporary every K group and spilled several to the stack (the
// 8-bit path's 12): 10-30% slower on the 8-bit path, a few percent on the 7-bit one (measured on an emulated
// AVX2-only host, perf/RESULTS.md).

// u8 x s8 pairs -> int16 (vpmaddubsw) -> int32 (vpmaddwd with ones), added into a0 (w0) and a1 (w1). The
// second product overwrites the broadcast, which it is the last to read, so a row step needs two scratch
// registers.
inline void step_bytes(__m256i& a0, __m256i& a1, const uint8_t* x, __m256i w0, __m256i w1, __m256i ones) {
    __m256i b, t;
    __asm__("vpbroadcastd %[x], %[b]\n\t"
            "vpmaddubsw %[w0], %[b], %[t]\n\t"
            "vpmaddwd %[ones], %[t], %[t]\n\t"
            "vpaddd %[t], %[a0], %[a0]\n\t"
            "vpmaddubsw %[w1], %[b], %[b]\n\t"
            "vpmaddwd %[ones], %[b], %[b]\n\t"
            "vpaddd %[b], %[a1], %[a1]"
            : [a0] "+x"(a0), [a1] "+x"(a1), [b] "=&x"(b), [t] "=&x"(t)
            : [x] "m"(*reinterpret_cast<const int32_t*>(x)), [w0] "x"(w0), [w1] "x"(w1), [ones] "x"(ones));
}

// int16 pairs x int16 pairs -> int32 (vpmaddwd), added into a0 (w0) and a1 (w1).
inline void step_words(__m256i& a0, __m256i& a1, const uint8_t* x, __m256i w0, __m256i w1) {
    __m256i b, t;
    __asm__("vpbroadcastd %[x], %[b]\n\t"
            "vpmaddwd %[w0], %[b], %[t]\n\t"
            "vpaddd %[t], %[a0], %[a0]\n\t"
            "vpmaddwd %[w1], %[b], %[t]\n\t"
            "vpaddd %[t], %[a1], %[a1]"
            : [a0] "+x"(a0), [a1] "+x"(a1), [b] "=&x"(b), [t] "=&x"(t)
            : [x] "m"(*reinterpret_cast<const int32_t*>(x)), [w0] "x"(w0), [w1] "x"(w1));
}

struct Avx2Bytes {
    // 5 rows x 2 ymm = 10 accumulators + ones, both weight vectors, the broadcast and the product: 15 of 16
    // registers. Loading the weights once per K group, rather than as a memory operand of every row's
    // vpmaddubsw (which left room for 6 rows), measured 4-7% faster at every M >= 16 shape of the bench, and
    // no longer swung by a few percent with where the linker placed the loop.
    static constexpr int kMR = 5, kNV = 1;

    template <int MR, int NV>
    __attribute__((noinline)) static void kernel(const MicroCall& k) {
        static_assert(NV == 1);
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i acc[MR][2];
        load_acc<MR>(k, acc);
        const int8_t* b = k.b;
        const uint8_t* a = k.a;
        for (int64_t g = 0; g < k.kg; ++g, b += k.group_bytes, a += 4) {
            prefetch(b, kPrefetchBytes);  // one 64-byte line per K group
            // Into L2 only: the block in L1 still has row blocks to serve. At 4096 x 4096, M = 16, where the
            // first row block otherwise fetches each block alone: +1.8% (in-process A/B; into L1, -2% at M = 64).
            if (k.next_block != 0) prefetch<_MM_HINT_T1>(b, k.next_block);
            const __m256i w0 = load(b), w1 = load(b + 32);
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) step_bytes(acc[r][0], acc[r][1], a + r * k.lda, w0, w1, ones);
        }
        store_acc<MR>(k, acc);
    }
};

// 16 int8 weights sign-extended to int16.
inline __m256i widen(const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Int8Weights: the weights are stored as int8 (64 bytes per K group, see kWidenAtRunTime) and sign-extended
// here, else as int16 (128 bytes).
template <bool Int8Weights>
struct Avx2Widened {
    // 6 rows x 2 ymm = 12 accumulators; each K group in two halves (K pairs 0-1, then 2-3), so only two
    // weight vectors are live beside the broadcast and the product: 16 of 16 registers.
    static constexpr int kMR = 6, kNV = 1;
    static constexpr int64_t kHalfBytes = Int8Weights ? 32 : 64;

    template <int MR, int NV>
    __attribute__((noinline)) static void kernel(const MicroCall& k) {
        static_assert(NV == 1);
        __m256i acc[MR][2];
        load_acc<MR>(k, acc);
        const int8_t* b = k.b;
        const uint8_t* a = k.a;  // int16 activations, 8 bytes per K group
        for (int64_t g = 0; g < k.kg; ++g, b += k.group_bytes, a += 8) {
            prefetch(b, kPrefetchBytes);  // the K group's one or two 64-byte lines
            if constexpr (!Int8Weights) prefetch(b, kPrefetchBytes + 64);
#pragma GCC unroll 2
            for (int half = 0; half < 2; ++half) {
                const int8_t* w = b + kHalfBytes * half;
                const __m256i w0 = Int8Weights ? widen(w) : load(w);
                const __m256i w1 = Int8Weights ? widen(w + 16) : load(w + 32);
#pragma GCC unroll 8
                for (int r = 0; r < MR; ++r) step_words(acc[r][0], acc[r][1], a + r * k.lda + 4 * half, w0, w1);
            }
        }
        store_acc<MR>(k, acc);
    }
};

}  // namespace

void tile_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* scratch) {
    // Every path stores int32 output itself (StoresOutput): +4% at K = 256, 1-3% at K >= 1024 (7-bit, A/B
    // measured), where the scratch round trip was a fixed cost per tile.
    if (g.a_group_bytes == 8 && g.block_bytes == 64) {
        // Int8 weights: a 16 KiB B micro-panel at 256 K groups, as on the 7-bit path.
        run_tile<Avx2Widened<true>, 256, true>(g, m0, m1, p0, p1, scratch);
    } else if (g.a_group_bytes == 8) {
        run_tile<Avx2Widened<false>, kKcGroups, true>(g, m0, m1, p0, p1, scratch);
    } else {
        // 256 K groups per cache block: the 7-bit path's one-panel B micro-panel is then 16 KiB, still in L1,
        // and each tile's accumulators go through memory half as often (+2-5% at K >= 1024, A/B measured).
        // RowsFirst: +0.5-2% at K = 256 (256 x 1024, A/B measured), neutral on the 8-bit path, so not taken there.
        run_tile<Avx2Bytes, 256, true, true>(g, m0, m1, p0, p1, scratch);
    }
}

int64_t peak_loop_avx2(int64_t iterations) {
    // The 7-bit path's sequence (vpmaddubsw, vpmaddwd with ones, vpaddd) on 8 independent chains.
    volatile int32_t seed = 0x01020304;
    const __m256i x = _mm256_set1_epi32(seed), w = _mm256_set1_epi32(seed + 1), ones = _mm256_set1_epi16(1);
    __m256i c[8];
    for (auto& v : c) v = x;
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
            __m256i p = _mm256_maddubs_epi16(x, w);
            __asm__ volatile("" : "+x"(p));  // keeps the product inside the loop
            c[i] = _mm256_add_epi32(c[i], _mm256_madd_epi16(p, ones));
        }
    }
    __m256i sum = c[0];
    for (int i = 1; i < 8; ++i) sum = _mm256_add_epi32(sum, c[i]);
    volatile int32_t sink = _mm256_extract_epi32(sum, 0);
    (void)sink;
    return iterations * 8 * 32 * 2;
}

}  // namespace tidal
