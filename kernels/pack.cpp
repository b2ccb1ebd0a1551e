// Weight packing: done once per model load, so it favours clarity over speed.
#include <algorithm>
#include <cstddef>
#include <cstring>

#include "gemm.h"

namespace tidal {

namespace {

// Every weight in [-64, 64] keeps vpmaddubsw's pair sums below int16 saturation.
bool fits_half_range(const int8_t* b, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
        if (b[i] < -64 || b[i] > 64) return false;
    return true;
}

}  // namespace

PackedWeights pack_weights(const int8_t* b, int64_t k, int64_t n, bool transposed, const int32_t* zero_points,
                           Isa isa) {
    PackedWeights w;
    w.isa = isa;
    w.k = k;
    w.n = n;
    w.k_groups = (k + 3) / 4;
    w.panels = (n + 15) / 16;
    w.widened = isa == Isa::avx2 && !fits_half_range(b, k * n);
    const bool stored_wide = w.widened && k * n < kWidenAtRunTime;
    w.block_bytes = stored_wide ? 128 : 64;
    w.group = panel_group(isa);
    w.data.assign(static_cast<std::size_t>(w.panels * w.k_groups * w.block_bytes), 0);
    w.col_sums.assign(static_cast<std::size_t>(w.panels * 16), 0);
    w.zero_points.assign(static_cast<std::size_t>(w.panels * 16), 0);

    for (int64_t kk = 0; kk < k; ++kk) {
        for (int64_t nn = 0; nn < n; ++nn) {
            const int8_t value = transposed ? b[nn * k + kk] : b[kk * n + nn];
            const int64_t panel = nn / 16, lane = nn % 16, kgroup = kk / 4, byte = kk % 4;
            const int64_t first = panel / w.group * w.group, width = std::min(w.group, w.panels - first);
            int8_t* block = w.data.data() + first * w.k_groups * w.block_bytes +
                            (kgroup * width + panel - first) * w.block_bytes;
            if (w.widened) {  // in the order of the int16 lanes they are multiplied in
                const int64_t slot = (byte / 2) * 32 + (lane / 8) * 16 + (lane % 8) * 2 + byte % 2;
                if (stored_wide) {
                    const int16_t wide = value;
                    std::memcpy(block + 2 * slot, &wide, sizeof wide);
                } else {
                    block[slot] = value;
                }
            } else {
                block[lane * 4 + byte] = value;
            }
            w.col_sums[nn] += value;
        }
    }
    if (zero_points != nullptr) {
        for (int64_t nn = 0; nn < n; ++nn) {
            w.zero_points[nn] = zero_points[nn];
            w.has_zero_points = w.has_zero_points || zero_points[nn] != 0;
        }
    }
    return w;
}

}  // namespace tidal
