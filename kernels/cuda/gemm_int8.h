// CUDA int8 GEMM: C[M,N] (int32) = A[M,K] (int8, row-major) x Bt[N,K] (int8, row-major, i.e. B column-major).
// Built only when CMake finds a CUDA toolkit; everything else in tidal works without it.
#pragma once

#include <cstdint>

namespace tidal::cuda {

enum class Algo : int { dp4a = 0, mma = 1 };

// Launches on `stream` (nullptr: the legacy default stream) without synchronizing. Pointers are device
// pointers; K must be a multiple of 4 and the rows 4-byte aligned. Returns nullptr or an error message.
const char* gemm_s8s8_s32(const int8_t* a, const int8_t* bt, int32_t* c, int m, int n, int k, Algo algo,
                          void* stream);

// Compute capability of the current device as major * 10 + minor; 0 when there is no usable device.
int device_sm();

}  // namespace tidal::cuda
