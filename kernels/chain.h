// A quantized MLP as one native call: quantize the fp32 input, run every layer's GEMM with its fused
// epilogue straight into the next layer's u8 activations, and write the last layer's output. One call
// per batch keeps the per-layer Python and allocation overhead out of small-batch latency.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "gemm.h"

namespace tidal {

struct ChainLayer {
    const PackedWeights* w = nullptr;  // owned by the caller and kept alive while the chain exists
    int32_t a_zero_point = 0;
    std::vector<float> scale;          // [N]
    std::vector<float> bias;           // [N], or empty
    std::vector<int32_t> col_terms;    // column_terms(*w, a_zero_point)
    Epilogue ep;                       // scale and bias pointers are filled in at run time
};

class Chain {
  public:
    Chain(float input_scale, int32_t input_zero_point) : in_scale_(input_scale), in_zero_point_(input_zero_point) {}

    // Layers after the first consume the previous layer's u8 output; the caller checks shapes and kinds.
    void add(ChainLayer layer) { layers_.push_back(std::move(layer)); }
    const std::vector<ChainLayer>& layers() const { return layers_; }

    // x: M x K fp32 rows; out: M x N of the last layer's output kind. Safe to call from several threads.
    void run(const float* x, int64_t m, void* out, int threads) const;

  private:
    float in_scale_;
    int32_t in_zero_point_;
    std::vector<ChainLayer> layers_;
};

}  // namespace tidal
