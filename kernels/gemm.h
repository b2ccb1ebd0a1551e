// u8 x s8 -> s32 GEMM with prepacked weights and a fused epilogue.
//
// C[m][n] = sum_k (A[m][k] - za) * (B[k][n] - zb[n]), then per column:
//   v = C * scale[n]; optional mid rounding point (a QuantizeLinear/DequantizeLinear
//   pair between the product and the bias); v += bias[n]; v = max(v, lo);
//   output as int32 (raw C), fp32 (v), u8 (q = round-half-even(v / out_scale) + out_zp, saturated) or
//   fp32 dequantized from that q ((q - out_zp) * out_scale: a QuantizeLinear/DequantizeLinear pair).
//
// Signed activations are handled by the caller: s8 x with zero point z is u8 (x + 128) with z + 128.
#pragma once

#include <cstdint>
#include <vector>

namespace tidal {

enum class Isa : int { scalar = 0, avx2 = 1, avx_vnni = 2, avx512_vnni = 3 };

const char* isa_name(Isa isa);
bool isa_from_name(const char* name, Isa* out);
// Whether this CPU (and OS) can execute `isa`; scalar always can.
bool cpu_supports(Isa isa);
// Whether this build compiled `isa` (the compiler may lack -mavxvnni).
bool isa_compiled(Isa isa);
// The fastest compiled ISA this CPU runs, chosen once per process; scalar only when nothing else runs.
Isa best_isa();

// Weights packed once: panels of 16 columns, K in groups of 4 bytes, so one 64-byte block feeds one
// 512-bit vpdpbusd (or two 256-bit ones). AVX2 has no exact u8 x s8 dot product: vpmaddubsw adds each
// pair of products in saturating int16, exact only while every weight lies in [-64, 64] (7-bit weights,
// 2 * 255 * 64 < 2^15). Wider weights are multiplied as int16 (vpmaddwd) by activations widened the same
// way, in the order K pairs 0-1 then 2-3, each as lanes 0-7 then 8-15: stored widened (int16, 128 bytes per
// block), or, for matrices of kWidenAtRunTime weights or more, as int8 in that order (64 bytes per block)
// and sign-extended by the micro-kernel.
// Panels are interleaved in groups of as many as the ISA's micro-kernel reads at once, so its weights
// arrive as one sequential stream: group g (the last may be narrower) holds, for each K group in turn,
// the blocks of its panels side by side.
struct PackedWeights {
    Isa isa = Isa::scalar;
    int64_t k = 0, n = 0;        // logical shape of B (K x N)
    int64_t k_groups = 0;        // ceil(K / 4)
    int64_t panels = 0;          // ceil(N / 16)
    int64_t block_bytes = 64;    // bytes per (panel, k group): 64, or 128 when stored widened
    int64_t group = 1;           // panels interleaved per K group (panel_group(isa))
    std::vector<int8_t> data;    // [panels][k_groups][block_bytes], zero padded
    std::vector<int32_t> col_sums;     // [panels * 16] sum over k of B, for the activation zero point
    std::vector<int32_t> zero_points;  // [panels * 16] weight zero points (zeros when symmetric)
    bool has_zero_points = false;
    bool widened = false;        // AVX2 only: int16 products, activations widened at run time

};

// From this many weights (K x N) on, widened weights stay int8 in memory: an int16 copy of 16 MiB or more no
// longer fits the last-level cache, and at small M (4096 x 4096, M = 16: +13-15%) the GEMM waited on streaming
// it, while widening in the micro-kernel costs 2-5% where the weights stay in cache.
constexpr int64_t kWidenAtRunTime = int64_t{1} << 23;

// Panels each ISA's micro-kernel reads per K group (its tile width / 16).
constexpr int64_t panel_group(Isa isa) { return isa == Isa::avx512_vnni ? 4 : 1; }

// Packs a row-major K x N int8 matrix (or N x K when transposed) for `isa`.
PackedWeights pack_weights(const int8_t* b, int64_t k, int64_t n, bool transposed, const int32_t* zero_points,
                           Isa isa);

enum class OutKind : int { s32 = 0, f32 = 1, u8 = 2, dq = 3 };

struct Epilogue {
    OutKind kind = OutKind::s32;
    const float* scale = nullptr;  // [N]; required unless kind == s32
    const float* bias = nullptr;   // [N] or null
    float lower = -3.4e38f;        // 0 fuses a ReLU
    bool has_mid = false;          // a rounding point between the product and the bias
    float mid_scale = 1.f, mid_zero_point = 0.f;
    float out_scale = 1.f, out_zero_point = 0.f;  // kind == u8 or dq
};

struct GemmArgs {
    const uint8_t* a = nullptr;  // M x lda, row-major, lda >= K (bytes; int16 rows when widened)
    int64_t m = 0, lda = 0;
    int32_t a_zero_point = 0;
    const PackedWeights* w = nullptr;
    Epilogue ep;
    void* out = nullptr;  // M rows of int32, float or uint8
    int64_t ldo = 0;      // output row stride in elements; 0 means N
    // Optional: -za * colsum[n] + K * za * zb[n] precomputed for a fixed za (see column_terms).
    const int32_t* col_terms = nullptr;
    // Filled by gemm() so tile kernels touch raw pointers only (no std:: code compiled with ISA flags):
    int64_t k_groups = 0, panels = 0, block_bytes = 0, group = 1, n = 0;
    int64_t a_group_bytes = 4;  // bytes of one A row per K group: 4, or 8 when widened
    const int8_t* b = nullptr;
    const int32_t* zero_points = nullptr;  // [panels*16]
    const int32_t* row_sums = nullptr;     // [M] sum over k of A; null when the weights are symmetric
};

// The zero-point correction of every output column for activations with zero point `za`.
std::vector<int32_t> column_terms(const PackedWeights& w, int32_t za);

// Runs on the calling thread plus up to `threads - 1` pool workers (0: all cores); the pool is only
// woken when the product is large enough to pay for it. Pads A internally when lda < 4 * k_groups.
void gemm(const GemmArgs& args, int threads);

// Quantizes fp32 to u8: saturate(round_half_even(x / scale) + zero_point), rows padded with
// zeros from `cols` to `ld`.
void quantize_u8(const float* x, int64_t rows, int64_t cols, float scale, int32_t zero_point, uint8_t* out,
                 int64_t ld);

// Tile kernels, one per ISA translation unit: rows [m0, m1) and panels [p0, p1) of the output.
// scratch holds (m1 - m0) x 64 int32.
using TileFn = void (*)(const GemmArgs&, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* scratch);
void tile_scalar(const GemmArgs&, int64_t, int64_t, int64_t, int64_t, int32_t*);
void tile_avx2(const GemmArgs&, int64_t, int64_t, int64_t, int64_t, int32_t*);
void tile_avx_vnni(const GemmArgs&, int64_t, int64_t, int64_t, int64_t, int32_t*);
void tile_avx512_vnni(const GemmArgs&, int64_t, int64_t, int64_t, int64_t, int32_t*);

// Multiply-accumulate throughput of a register-only vpdpbusd loop: the ceiling the GEMM is measured against.
// Returns the number of int8 operations (2 per multiply-add) performed by `iterations` loop trips.
int64_t peak_loop_avx512_vnni(int64_t iterations);
int64_t peak_loop_avx_vnni(int64_t iterations);
int64_t peak_loop_avx2(int64_t iterations);  // the 7-bit AVX2 sequence: AVX2's exact u8 x s8 ceiling

}  // namespace tidal
