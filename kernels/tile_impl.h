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
// NaN maps to `lo`, so a float-to-int conversion after it is always defined. Written as max then min
// so it compiles to vmaxps/vminps.
inline float clampf(float v, float lo, float hi) {
    const float t = v > lo ? v : lo;
    return t < hi ? t : hi;
}

inline int32_t load_i32(const uint8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

// Epilogue constants copied out of GemmArgs, so stores to the output cannot alias them and the compiler
// keeps them in registers. Zero points are folded into the clamp bounds: clamp(rint(x) + z, 0, 255) - z is
// clamp(rint(x), -z, 255 - z) exactly, since every value involved is a small integer in float. ReLU before
// a requantization is folded into its lower bound too: rint(max(v, 0) * inv) == max(rint(v * inv), 0).
struct EpilogueConsts {
    float lower;                           // ReLU bound, applied only to unrounded float output
    float inv_mid, mid_scale, mid_lo, mid_hi;
    float inv_out, out_scale, out_zero_point, out_lo, out_hi;

    static float relu_floor(float scaled_lower, float lo) {
        const float r = __builtin_nearbyintf(scaled_lower);
        return r > lo ? r : lo;
    }

    explicit EpilogueConsts(const Epilogue& ep)
        : lower(ep.lower),
          inv_mid(1.f / ep.mid_scale),
          mid_scale(ep.mid_scale),
          mid_lo(-ep.mid_zero_point),
          mid_hi(255.f - ep.mid_zero_point),
          inv_out(1.f / ep.out_scale),
          out_scale(ep.out_scale),
          out_zero_point(ep.out_zero_point),
          out_lo(relu_floor(ep.lower * inv_out, -ep.out_zero_point)),
          out_hi(255.f - ep.out_zero_point) {}
};

// One output row segment. The accumulators already include the column zero-point terms (the micro-kernels
// start from them). Cols > 0 fixes the trip count (a whole 64-column tile) so the loop vectorizes without
// remainder handling; Cols == 0 handles the ragged last tile.
template <bool Mid, bool Bias, OutKind Kind, int64_t Cols>
void epilogue_row(const int32_t* __restrict acc, const float* __restrict scale, const float* __restrict bias,
                  EpilogueConsts e, void* __restrict out, int64_t cols) {
    const int64_t n = Cols > 0 ? Cols : cols;
    if constexpr (Kind == OutKind::s32) {
        int32_t* __restrict o = static_cast<int32_t*>(out);
        for (int64_t c = 0; c < n; ++c) o[c] = acc[c];
        return;
    }
    for (int64_t c = 0; c < n; ++c) {
        float v = static_cast<float>(acc[c]) * scale[c];
        if constexpr (Mid) v = clampf(__builtin_nearbyintf(v * e.inv_mid), e.mid_lo, e.mid_hi) * e.mid_scale;
        if constexpr (Bias) v += bias[c];
        if constexpr (Kind == OutKind::f32) {
            static_cast<float*>(out)[c] = v > e.lower ? v : e.lower;
        } else {
            const float q = clampf(__builtin_nearbyintf(v * e.inv_out), e.out_lo, e.out_hi);
            if constexpr (Kind == OutKind::u8) {
                static_cast<uint8_t*>(out)[c] = static_cast<uint8_t>(q + e.out_zero_point);
            } else {
                static_cast<float*>(out)[c] = q * e.out_scale;
            }
        }
    }
}

// Converts finished int32 tiles (rows [m0, m1), columns [col0, col0 + cols)) to the requested output.
template <bool Mid, bool Bias, OutKind Kind>
void epilogue_rows(const GemmArgs& g, int64_t m0, int64_t m1, int64_t col0, int64_t cols, int32_t* scratch) {
    const Epilogue& ep = g.ep;
    const EpilogueConsts e(ep);
    const int64_t elem = Kind == OutKind::u8 ? 1 : 4;
    const float* scale = ep.scale ? ep.scale + col0 : nullptr;
    const float* bias = ep.bias ? ep.bias + col0 : nullptr;
    for (int64_t m = m0; m < m1; ++m) {
        int32_t* acc = scratch + (m - m0) * kTileCols;
        if (g.row_sums) {  // asymmetric weights only: the -rowsum(A) * zb[n] term
            const int32_t rs = g.row_sums[m];
            const int32_t* zp = g.zero_points + col0;
            for (int64_t c = 0; c < cols; ++c) acc[c] -= rs * zp[c];
        }
        void* out = static_cast<char*>(g.out) + (m * g.ldo + col0) * elem;
        if (cols == kTileCols) {
            epilogue_row<Mid, Bias, Kind, kTileCols>(acc, scale, bias, e, out, cols);
        } else if (cols == 16) {
            // One-panel tiles (AVX2, AVX-VNNI): a fixed trip count, so the tile is read back with the same
            // 32-byte accesses the micro-kernel stored it with. The variable-count loop cost 10-15% of the
            // AVX2 7-bit GEMM at K = 256 (s32 output, A/B measured).
            epilogue_row<Mid, Bias, Kind, 16>(acc, scale, bias, e, out, cols);
        } else {
            epilogue_row<Mid, Bias, Kind, 0>(acc, scale, bias, e, out, cols);
        }
    }
}

template <OutKind Kind>
void epilogue_kind(const GemmArgs& g, int64_t m0, int64_t m1, int64_t col0, int64_t cols, int32_t* scratch) {
    const bool bias = g.ep.bias != nullptr;
    if (g.ep.has_mid) {
        return bias ? epilogue_rows<true, true, Kind>(g, m0, m1, col0, cols, scratch)
                    : epilogue_rows<true, false, Kind>(g, m0, m1, col0, cols, scratch);
    }
    return bias ? epilogue_rows<false, true, Kind>(g, m0, m1, col0, cols, scratch)
                : epilogue_rows<false, false, Kind>(g, m0, m1, col0, cols, scratch);
}

inline void epilogue(const GemmArgs& g, int64_t m0, int64_t m1, int64_t col0, int64_t cols, int32_t* scratch) {
    switch (g.ep.kind) {
        case OutKind::s32:
            return epilogue_rows<false, false, OutKind::s32>(g, m0, m1, col0, cols, scratch);
        case OutKind::f32:
            return epilogue_kind<OutKind::f32>(g, m0, m1, col0, cols, scratch);
        case OutKind::u8:
            return epilogue_kind<OutKind::u8>(g, m0, m1, col0, cols, scratch);
        case OutKind::dq:
            return epilogue_kind<OutKind::dq>(g, m0, m1, col0, cols, scratch);
    }
}

// Picks the Micro::kernel<MR, NV> instantiation for a tail tile at run time.
struct MicroCall {
    const uint8_t* a;
    int64_t lda;
    const int8_t* b;       // the group's blocks for this K block; its panels side by side per K group
    int64_t group_bytes;   // from one K group to the next
    int64_t kg;            // K groups in this block
    int32_t* c;            // scratch, row stride kTileCols
    const int32_t* init;   // starting value of every row (the column zero-point terms) when !accumulate
    bool accumulate;
    // Where the finished rows go instead of c (row stride ldo), when the tile needs no epilogue; only set
    // for micro-kernels run with run_tile<..., StoresOutput = true>.
    int32_t* out = nullptr;
    int64_t ldo = 0;
    // From b to the same K group of the panel group's next K block, set for every row block but the first
    // (which streams this block in): a micro-kernel may prefetch the next block while this one is in L1.
    // 0 when there is none.
    int64_t next_block = 0;
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
// The int32 tile lives in `scratch` across K blocks; each row block is finished by the epilogue right
// after its last K block, while its tile is still in L1.
// Kc: K groups per cache block (kKcGroups unless the micro-kernel's B micro-panel is narrow enough for more).
// StoresOutput: the micro-kernel honours MicroCall::out, so an int32 output with symmetric weights is stored
// by it directly from its last K block, without the round trip through scratch and the epilogue's copy.
// RowsFirst: when K is one block and the task's weights fit in kRowsFirstBytes, row blocks go outermost
// instead: each row block of A stays in L1 across every panel while the weights stream from L2, and output
// rows are written in order.
constexpr int64_t kRowsFirstBytes = 512 * 1024;

template <class Micro, int64_t Kc = kKcGroups, bool StoresOutput = false, bool RowsFirst = false>
void run_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* scratch) {
    static_assert(Micro::kNV <= kTileCols / 16);
    const bool raw = StoresOutput && g.ep.kind == OutKind::s32 && g.row_sums == nullptr;
    // Row blocks of near-equal height (8 rows: 4 + 4, not 6 + 2), so no block is starved of accumulators
    // while the B micro-panel it shares with the others sits in L1.
    const int64_t blocks = (m1 - m0 + Micro::kMR - 1) / Micro::kMR;
    const int64_t base = blocks > 0 ? (m1 - m0) / blocks : 0, taller = blocks > 0 ? (m1 - m0) % blocks : 0;
    // Rows [m, m + mr) of the panel group at p (tasks split at whole groups, so [p, p + nv) is exactly one
    // packed group), K groups [k0, k0 + Kc).
    auto step = [&](int64_t p, int64_t k0, int64_t m, int mr) {
        const int nv = static_cast<int>(min64(Micro::kNV, p1 - p));
        const int64_t group_bytes = nv * g.block_bytes;
        const int8_t* bp = g.b + p * g.k_groups * g.block_bytes;
        const int64_t col0 = p * 16, cols = min64(g.n - col0, nv * 16);
        const int64_t kc = min64(Kc, g.k_groups - k0);
        const bool last = k0 + kc == g.k_groups;
        int32_t* tile = scratch + (m - m0) * kTileCols;
        MicroCall k{g.a + m * g.lda + g.a_group_bytes * k0, g.lda, bp + k0 * group_bytes,
                    group_bytes, kc, tile, g.col_terms + col0, k0 > 0};
        if (m != m0 && !last) k.next_block = kc * group_bytes;
        const bool stored = raw && last && cols == nv * 16;
        if (stored) {
            k.out = static_cast<int32_t*>(g.out) + m * g.ldo + col0;
            k.ldo = g.ldo;
        }
        call_micro<Micro>(mr, nv, k);
        if (last && !stored) epilogue(g, m, m + mr, col0, cols, tile);
    };
    if (RowsFirst && g.k_groups <= Kc && (p1 - p0) * g.k_groups * g.block_bytes <= kRowsFirstBytes) {
        for (int64_t i = 0, m = m0; i < blocks; ++i) {
            const int mr = static_cast<int>(base + (i < taller ? 1 : 0));
            for (int64_t p = p0; p < p1; p += Micro::kNV) step(p, 0, m, mr);
            m += mr;
        }
        return;
    }
    for (int64_t p = p0; p < p1; p += Micro::kNV) {
        for (int64_t k0 = 0; k0 < g.k_groups; k0 += Kc) {
            for (int64_t i = 0, m = m0; i < blocks; ++i) {
                const int mr = static_cast<int>(base + (i < taller ? 1 : 0));
                step(p, k0, m, mr);
                m += mr;
            }
        }
    }
}

}  // namespace
}  // namespace tidal
