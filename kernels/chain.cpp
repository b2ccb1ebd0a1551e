#include "chain.h"

#include <cstddef>

namespace tidal {

void Chain::run(const float* x, int64_t m, void* out, int threads) const {
    // Activations are stored with rows padded to whole K groups (zeros past K), as the kernels read them.
    const PackedWeights& first = *layers_.front().w;
    int64_t ld = 4 * first.k_groups;
    std::vector<uint8_t> a(static_cast<std::size_t>(m * ld)), next;
    quantize_u8(x, m, first.k, in_scale_, in_zero_point_, a.data(), ld);
    for (std::size_t i = 0; i < layers_.size(); ++i) {
        const ChainLayer& layer = layers_[i];
        GemmArgs g;
        g.a = a.data();
        g.m = m;
        g.lda = ld;
        g.a_zero_point = layer.a_zero_point;
        g.w = layer.w;
        g.ep = layer.ep;
        g.ep.scale = layer.scale.data();
        g.ep.bias = layer.bias.empty() ? nullptr : layer.bias.data();
        g.col_terms = layer.col_terms.data();
        const bool last = i + 1 == layers_.size();
        int64_t next_ld = 0;
        if (last) {
            g.out = out;
        } else {
            next_ld = 4 * layers_[i + 1].w->k_groups;
            next.assign(static_cast<std::size_t>(m * next_ld), 0);
            g.out = next.data();
            g.ldo = next_ld;
        }
        gemm(g, threads);
        if (!last) {
            a.swap(next);
            ld = next_ld;
        }
    }
}

}  // namespace tidal
