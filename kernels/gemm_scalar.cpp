// Portable reference over the same packed layout, driver and epilogue; tests force it to check the
// shared code apart from any intrinsic. Dispatch never picks it for serving (the backend needs AVX2).
#include "tile_impl.h"

namespace tidal {
namespace {

struct Scalar {
    static constexpr int kMR = 1, kNV = 1;

    template <int MR, int NV>
    static void kernel(const MicroCall& k) {
        int32_t acc[16];
        for (int j = 0; j < 16; ++j) acc[j] = k.accumulate ? k.c[j] : k.init[j];
        for (int64_t g = 0; g < k.kg; ++g) {
            const uint8_t* x = k.a + 4 * g;
            const int8_t* w = k.b + k.group_bytes * g;
            for (int j = 0; j < 16; ++j)
                for (int i = 0; i < 4; ++i) acc[j] += static_cast<int32_t>(x[i]) * w[4 * j + i];
        }
        for (int j = 0; j < 16; ++j) k.c[j] = acc[j];
    }
};

}  // namespace

void tile_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int32_t* scratch) {
    run_tile<Scalar>(g, m0, m1, p0, p1, scratch);
}

}  // namespace tidal
