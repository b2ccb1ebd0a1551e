// Two int8 GEMM kernels over the same operand layout (K contiguous in both A and Bt):
//  - dp4a: 4-way int8 dot products on CUDA cores, any sm_61+ device;
//  - mma:  mma.sync m16n8k32 s8 tensor-core tiles, sm_80+ (the body is compiled only for those arches).
#include <cuda_runtime.h>

#include "gemm_int8.h"

namespace tidal::cuda {
namespace {

constexpr int kTile = 64;       // block tile: 64 x 64 outputs
constexpr int kKBytes = 32;     // K bytes staged per step
constexpr int kWords = kKBytes / 4;

// Stages a 64 x 32-byte slab of a K-contiguous matrix into shared memory as 32-bit words, zero-filled
// past the matrix edge. `pitch` is the shared row stride in words.
__device__ void stage(const int8_t* src, int rows, int k, int row0, int k0, int* dst, int pitch, int tid,
                      int nthreads) {
    for (int i = tid; i < kTile * kWords; i += nthreads) {
        const int r = i / kWords, w = i % kWords;
        const int gr = row0 + r, gk = k0 + 4 * w;
        dst[r * pitch + w] = (gr < rows && gk < k) ? *reinterpret_cast<const int*>(src + (size_t)gr * k + gk) : 0;
    }
}

// 256 threads, each owning a 4 x 4 set of outputs strided by 16 (conflict-free shared reads).
__global__ void __launch_bounds__(256) gemm_dp4a(const int8_t* a, const int8_t* bt, int32_t* c, int m, int n, int k) {
    constexpr int kPitch = kWords + 1;
    __shared__ int as[kTile * kPitch];
    __shared__ int bs[kTile * kPitch];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int row0 = blockIdx.y * kTile, col0 = blockIdx.x * kTile;
    int acc[4][4] = {};
    for (int k0 = 0; k0 < k; k0 += kKBytes) {
        stage(a, m, k, row0, k0, as, kPitch, threadIdx.x, 256);
        stage(bt, n, k, col0, k0, bs, kPitch, threadIdx.x, 256);
        __syncthreads();
#pragma unroll
        for (int w = 0; w < kWords; ++w) {
            int av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = as[(ty + 16 * i) * kPitch + w];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = bs[(tx + 16 * j) * kPitch + w];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = row0 + ty + 16 * i, col = col0 + tx + 16 * j;
            if (r < m && col < n) c[(size_t)r * n + col] = acc[i][j];
        }
}

// 128 threads = 4 warps in a 2 x 2 grid; each warp computes 32 x 32 outputs as 2 x 4 m16n8k32 tiles.
// Fragment layouts follow the PTX ISA for mma.m16n8k32 with .s8 operands: lane = 4 * group + t,
// A regs {row g, row g+8} x {bytes 4t.., 16+4t..}, B regs column g x {bytes 4t.., 16+4t..},
// C regs {row g, row g+8} x columns {2t, 2t+1}.
__global__ void __launch_bounds__(128) gemm_mma(const int8_t* a, const int8_t* bt, int32_t* c, int m, int n, int k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int kPitch = 12;  // words; 12 * g + t hits 32 distinct banks for g < 8, t < 4
    __shared__ int as[kTile * kPitch];
    __shared__ int bs[kTile * kPitch];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
    const int row0 = blockIdx.y * kTile, col0 = blockIdx.x * kTile;
    int acc[2][4][4] = {};
    for (int k0 = 0; k0 < k; k0 += kKBytes) {
        stage(a, m, k, row0, k0, as, kPitch, threadIdx.x, 128);
        stage(bt, n, k, col0, k0, bs, kPitch, threadIdx.x, 128);
        __syncthreads();
        int af[2][4], bf[4][2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = wr + 16 * i + g;
            af[i][0] = as[r * kPitch + t];
            af[i][1] = as[(r + 8) * kPitch + t];
            af[i][2] = as[r * kPitch + 4 + t];
            af[i][3] = as[(r + 8) * kPitch + 4 + t];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = wc + 8 * j + g;
            bf[j][0] = bs[col * kPitch + t];
            bf[j][1] = bs[col * kPitch + 4 + t];
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int* d = acc[i][j];
                asm volatile(
                    "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                    "{%0,%1,%2,%3};\n"
                    : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                    : "r"(af[i][0]), "r"(af[i][1]), "r"(af[i][2]), "r"(af[i][3]), "r"(bf[j][0]), "r"(bf[j][1]));
            }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = row0 + wr + 16 * i + g + (e >= 2 ? 8 : 0);
                const int col = col0 + wc + 8 * j + 2 * t + (e & 1);
                if (r < m && col < n) c[(size_t)r * n + col] = acc[i][j][e];
            }
#endif
}

}  // namespace

int device_sm() {
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return 0;
    return major * 10 + minor;
}

const char* gemm_s8s8_s32(const int8_t* a, const int8_t* bt, int32_t* c, int m, int n, int k, Algo algo,
                          void* stream) {
    if (m <= 0 || n <= 0 || k <= 0 || k % 4 != 0) return "gemm_s8s8_s32 needs positive M, N and K with K % 4 == 0";
    const int sm = device_sm();
    if (sm == 0) return "no usable CUDA device";
    if (algo == Algo::mma && sm < 80) return "the mma kernel needs compute capability 8.0 or newer";
    const dim3 grid((n + kTile - 1) / kTile, (m + kTile - 1) / kTile);
    auto s = static_cast<cudaStream_t>(stream);
    if (algo == Algo::mma) {
        gemm_mma<<<grid, 128, 0, s>>>(a, bt, c, m, n, k);
    } else {
        gemm_dp4a<<<grid, 256, 0, s>>>(a, bt, c, m, n, k);
    }
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace tidal::cuda
