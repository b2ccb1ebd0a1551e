// The blocked driver and the epilogue shared by every ISA translation unit.
//
// Included only by the per-ISA .cpp files, each compiled with its own -m flags. Everything here sits
// in an anonymous namespace and uses no std:: templates, so no function compiled with AVX-512 flags can
// be merged by the linker into code that runs on an AVX2-only CPU.
#pragma once

#include <cstdint>

#include "gemm.h"

namespace tidal {
namespace {

constexpr int64_t kTileCols = 64;  // scratch row width: 4 panels of 16 columns
// K groups per cache block: 512 bytes of K, so a 4-panel B micro-panel (32 KiB) stays in L1 while
// every row block of A streams past it.
constexpr int64_t kKcGroups = 128;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
// NaN maps to `lo`, so a float-to-int conversion after it is always defined.
inline float clampf(float v, float lo, float hi) { return v > lo ? (v < hi ? v : hi) : lo; }

inline int32_t load_i32(const uint8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

// Converts finished int32 tiles (rows [m0, m1), columns [col0, col0 + cols)) to the requested output.
template <bool Mid, OutKind Kind>
void epilogue_rows(const GemmArgs& g, int64_t m0, int64_t m1, int64_t col0, int64_t cols, const int32_t* scratch) {
    const Epilogue& ep = g.ep;
    const float inv_mid = 1.f / ep.mid_scale, inv_out = 1.f / ep.out_scale;
    for (int64_t m = m0; m < m1; ++m) {
        const int32_t* acc = scratch + (m - m0) * kTileCols;
        const int32_t rs = g.row_sums ? g.row_sums[m] : 0;
        const int32_t* ct = g.col_terms + col0;
        const int32_t* zp = g.zero_points + col0;
        if constexpr (Kind == OutKind::s32) {
            int32_t* out = static_cast<int32_t*>(g.out) + m * g.n + col0;
            for (int64_t c = 0; c < cols; ++c) out[c] = acc[c] + ct[c] - rs * zp[c];
            continue;
        }
        const float* scale = ep.scale + col0;
        const float* bias = ep.bias ? ep.bias + col0 : nullptr;
        float* outf = static_cast<float*>(g.out) + m * g.n + col0;
        uint8_t* outq = static_cast<uint8_t*>(g.out) + m * g.n + col0;
        for (int64_t c = 0; c < cols; ++c) {
            float v = static_cast<float>(acc[c] + ct[c] - rs * zp[c]) * scale[c];
            if constexpr (Mid) {
                v = (clampf(__builtin_nearbyintf(v * inv_mid) + ep.mid_zero_point, 0.f, 255.f) - ep.mid_zero_point) *
                    ep.mid_scale;
            }
            if (bias) v += bias[c];
            v = v < ep.lower ? ep.lower : v;
            if constexpr (Kind == OutKind::f32) {
                outf[c] = v;
            } else {
                outq[c] = static_cast<uint8_t>(clampf(__builtin_nearbyintf(v * inv_out) + ep.out_zero_point, 0.f, 255.f));
            }
        }
    }
}

inline void epilogue(const GemmArgs& g, int64_t m0, int64_t m1, int64_t col0, int64_t cols, const int32_t* scratch) {
    switch (g.ep.kind) {
        case OutKind::s32:
            return epilogue_rows<false, OutKind::s32>(g, m0, m1, col0, cols, scratch);
        case OutKind::f32:
            return g.ep.has_mid ? epilogue_rows<true, OutKind::f32>(g, m0, m1, col0, cols, scratch)
                                : epilogue_rows<false, OutKind::f32>(g, m0, m1, col0, cols, scratch);
        case OutKind::u8:
            return g.ep.has_mid ? epilogue_rows<true, OutKind::u8>(g, m0, m1, col0, cols, scratch)
                                : epilogue_rows<false, OutKind::u8>(g, m0, m1, col0, cols, scratch);
    }
}

// Picks the Micro::kernel<MR, NV> instantiation for a tail tile at run time.
struct MicroCall {
    const uint8_t* a;
    int64_t lda;
    const int8_t* b;
    int64_t stride;  // bytes between panels
    int64_t kg;      // k groups in this block
    int32_t* c;      // scratch, row stride kTileCols
    bool accumulate;
};

template <class Micro, int MR, int NV = Micro::kNV>
void call_nv(int nv, const MicroCall& k) {
    if constexpr (NV >= 1) {
        if (nv == NV) return Micro::template kernel<MR, NV>(k);
        call_nv<Micro, MR, NV - 1>(nv, k);
    }
}

template <class Micro, int MR = Micro::kMR>
void call_micro(int mr, int nv, const MicroCall& k) {
    if constexpr (MR >= 1) {
        if (mr == MR) return call_nv<Micro, MR>(nv, k);
        call_micro<Micro, MR - 1>(mr, nv, k);
    }
}

// Loop order: column panel groups (kNV panels, kept in L1 per K block), K blocks, row blocks of kMR.
// The int32 tile lives in `scratch` across K blocks and is finished by the epilogue once per group.
template <class Micro>
void run_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* scratch) {
    const int64_t stride = g.k_groups * g.block_bytes;
    for (int64_t p = p0; p < p1; p += Micro::kNV) {
        const int nv = static_cast<int>(min64(Micro::kNV, p1 - p));
        const int8_t* bp = g.b + p * stride;
        for (int64_t k0 = 0; k0 < g.k_groups; k0 += kKcGroups) {
            const int64_t kc = min64(kKcGroups, g.k_groups - k0);
            for (int64_t m = m0; m < m1; m += Micro::kMR) {
                const int mr = static_cast<int>(min64(Micro::kMR, m1 - m));
                const MicroCall k{g.a + m * g.lda + 4 * k0, g.lda, bp + k0 * g.block_bytes, stride, kc,
                                  scratch + (m - m0) * kTileCols, k0 > 0};
                call_micro<Micro>(mr, nv, k);
            }
        }
        const int64_t col0 = p * 16;
        epilogue(g, m0, m1, col0, min64(g.n - col0, nv * 16), scratch);
    }
}

}  // namespace
}  // namespace tidal
