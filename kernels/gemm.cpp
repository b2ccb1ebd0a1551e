// ISA detection and dispatch, per-call zero-point terms, and the split of a GEMM across threads.
#include "gemm.h"

#include <cpuid.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "thread_pool.h"

namespace tidal {

namespace {

struct CpuFeatures {
    bool avx2 = false, avx_vnni = false, avx512_vnni = false;
};

uint64_t xgetbv0() {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<uint64_t>(hi) << 32) | lo;
}

// CPUID bits plus XCR0, so a CPU whose OS does not save ymm/zmm state counts as lacking them.
CpuFeatures detect() {
    CpuFeatures f;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return f;
    const uint64_t xcr0 = xgetbv0();
    const bool ymm_state = (xcr0 & 0x6) == 0x6, zmm_state = (xcr0 & 0xe6) == 0xe6;
    if (!ymm_state || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
    const unsigned max_subleaf = a;
    f.avx2 = (b >> 5) & 1;
    const bool avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vnni = (c >> 11) & 1;
    f.avx512_vnni = zmm_state && avx512f && avx512bw && avx512vnni;
    if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx_vnni = f.avx2 && ((a >> 4) & 1);
    return f;
}

const CpuFeatures& features() {
    static const CpuFeatures f = detect();
    return f;
}

TileFn tile_fn(Isa isa) {
    switch (isa) {
        case Isa::avx512_vnni:
            return tile_avx512_vnni;
        case Isa::avx_vnni:
#ifdef TIDAL_HAVE_AVX_VNNI
            return tile_avx_vnni;
#else
            return nullptr;
#endif
        case Isa::avx2:
            return tile_avx2;
        case Isa::scalar:
            return tile_scalar;
    }
    return nullptr;
}

// Below this many multiply-adds per thread, waking a worker costs more than it saves.
constexpr int64_t kMinMacsPerThread = int64_t{1} << 22;

struct Split {
    int tasks = 1;
    bool by_rows = false;
    int64_t chunk = 0;  // rows or panels per task
};

Split plan(const GemmArgs& g, int threads) {
    const int64_t macs = g.m * g.n * g.k_groups * 4;
    const int64_t want = std::clamp<int64_t>(macs / kMinMacsPerThread, 1, threads);
    Split s;
    if (want <= 1) {
        s.chunk = g.panels;
        return s;
    }
    // Rows when every task still gets several row blocks, else column panels in multiples of 4 (whole
    // packed panel groups, see panel_group).
    s.by_rows = g.m >= want * 24;
    if (s.by_rows) {
        s.chunk = ((g.m + want - 1) / want + 5) / 6 * 6;
        s.tasks = static_cast<int>((g.m + s.chunk - 1) / s.chunk);
    } else {
        s.chunk = ((g.panels + want - 1) / want + 3) / 4 * 4;
        s.tasks = static_cast<int>((g.panels + s.chunk - 1) / s.chunk);
    }
    return s;
}

void run_task(const GemmArgs& g, TileFn fn, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    thread_local std::vector<int32_t> scratch;
    const size_t need = static_cast<size_t>((m1 - m0) * 64);
    if (scratch.size() < need) scratch.resize(need);
    fn(g, m0, m1, p0, p1, scratch.data());
}

}  // namespace

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx512_vnni:
            return "avx512_vnni";
        case Isa::avx_vnni:
            return "avx_vnni";
        case Isa::avx2:
            return "avx2";
        case Isa::scalar:
            return "scalar";
    }
    return "?";
}

bool isa_from_name(const char* name, Isa* out) {
    for (Isa isa : {Isa::avx512_vnni, Isa::avx_vnni, Isa::avx2, Isa::scalar}) {
        if (std::strcmp(name, isa_name(isa)) == 0) {
            *out = isa;
            return true;
        }
    }
    return false;
}

bool isa_compiled(Isa isa) { return tile_fn(isa) != nullptr; }

bool cpu_supports(Isa isa) {
    switch (isa) {
        case Isa::avx512_vnni:
            return features().avx512_vnni;
        case Isa::avx_vnni:
            return features().avx_vnni;
        case Isa::avx2:
            return features().avx2;
        case Isa::scalar:
            return true;
    }
    return false;
}

Isa best_isa() {
    static const Isa best = [] {
        for (Isa isa : {Isa::avx512_vnni, Isa::avx_vnni, Isa::avx2})
            if (cpu_supports(isa) && isa_compiled(isa)) return isa;
        return Isa::scalar;
    }();
    return best;
}

std::vector<int32_t> column_terms(const PackedWeights& w, int32_t za) {
    std::vector<int32_t> terms(w.col_sums.size());
    const int32_t k = static_cast<int32_t>(w.k);
    for (size_t n = 0; n < terms.size(); ++n) terms[n] = -za * w.col_sums[n] + k * za * w.zero_points[n];
    return terms;
}

void gemm(const GemmArgs& in, int threads) {
    const PackedWeights& w = *in.w;
    GemmArgs g = in;
    g.k_groups = w.k_groups;
    g.panels = w.panels;
    g.block_bytes = w.block_bytes;
    g.group = w.group;
    g.n = w.n;
    g.b = w.data.data();
    g.zero_points = w.zero_points.data();

    // The micro-kernels read whole groups of 4 bytes; pad rows whose length is not a multiple of 4.
    std::vector<uint8_t> padded;
    if (g.lda < 4 * w.k_groups) {
        const int64_t ld = 4 * w.k_groups;
        padded.assign(static_cast<size_t>(g.m * ld), 0);
        for (int64_t m = 0; m < g.m; ++m) std::memcpy(&padded[m * ld], g.a + m * g.lda, w.k);
        g.a = padded.data();
        g.lda = ld;
    }
    std::vector<int32_t> col_terms;
    if (g.col_terms == nullptr) {
        col_terms = column_terms(w, g.a_zero_point);
        g.col_terms = col_terms.data();
    }
    if (g.ldo == 0) g.ldo = w.n;
    std::vector<int32_t> row_sums;
    if (w.has_zero_points) {
        row_sums.assign(static_cast<size_t>(g.m), 0);
        for (int64_t m = 0; m < g.m; ++m)
            for (int64_t k = 0; k < w.k; ++k) row_sums[m] += g.a[m * g.lda + k];
        g.row_sums = row_sums.data();
    }
    // Widened (AVX2, 8-bit) weights multiply int16 activations: one widened copy of A per call, O(M x K)
    // beside the O(M x N x K) product.
    std::vector<int16_t> widened;
    if (w.widened) {
        const int64_t ld = 4 * w.k_groups;
        widened.assign(static_cast<size_t>(g.m * ld), 0);
        for (int64_t m = 0; m < g.m; ++m)
            for (int64_t k = 0; k < w.k; ++k) widened[m * ld + k] = g.a[m * g.lda + k];
        g.a = reinterpret_cast<const uint8_t*>(widened.data());
        g.lda = 2 * ld;
        g.a_group_bytes = 8;
    }

    const TileFn fn = tile_fn(w.isa);
    ThreadPool& pool = ThreadPool::instance();
    const int limit = threads > 0 ? threads : pool.workers() + 1;
    const Split s = plan(g, limit);
    if (s.tasks <= 1) return run_task(g, fn, 0, g.m, 0, g.panels);
    pool.run(s.tasks, [&](int t) {
        const int64_t lo = t * s.chunk;
        if (s.by_rows) {
            run_task(g, fn, lo, std::min(g.m, lo + s.chunk), 0, g.panels);
        } else {
            run_task(g, fn, 0, g.m, lo, std::min(g.panels, lo + s.chunk));
        }
    });
}

void quantize_u8(const float* x, int64_t rows, int64_t cols, float scale, int32_t zero_point, uint8_t* out,
                 int64_t ld) {
    // Round half to even without SSE4.1's roundps (this file targets baseline x86-64): for |q| <= 2^22,
    // adding and subtracting 1.5 * 2^23 rounds in the FPU's default mode. The clamp to +-512 keeps q in
    // that range (and maps NaN to the low end) without changing any saturated result.
    constexpr float kMagic = 12582912.f;
    const float zp = static_cast<float>(zero_point);
    for (int64_t r = 0; r < rows; ++r) {
        const float* __restrict src = x + r * cols;
        uint8_t* __restrict dst = out + r * ld;  // uint8_t may alias anything without __restrict
        for (int64_t c = 0; c < cols; ++c) {
            float q = src[c] / scale;
            q = q > -512.f ? q : -512.f;
            q = q < 512.f ? q : 512.f;
            q = ((q + kMagic) - kMagic) + zp;
            q = q > 0.f ? q : 0.f;
            q = q < 255.f ? q : 255.f;
            dst[c] = static_cast<uint8_t>(q);
        }
        for (int64_t c = cols; c < ld; ++c) dst[c] = 0;
    }
}

}  // namespace tidal
