// The CUDA runtime calls tidal's GPU backends need, as plain functions on integer handles (device and
// pinned host pointers, streams, graph executables), so TensorRT, ONNX Runtime's I/O binding and the int8
// GEMM share one way to allocate and move memory without another Python package. Each call checks its
// cudaError_t and raises RuntimeError with CUDA's message; the GIL is released around anything that waits.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "gemm_int8.h"
#include "runtime_binding.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <class T>
T* ptr(uintptr_t handle) {
    return reinterpret_cast<T*>(handle);
}

cudaStream_t stream_of(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

int device_count() {
    int n = 0;
    // No driver or no device is an answer here (0), not an error.
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

uintptr_t device_alloc(size_t nbytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, nbytes ? nbytes : 1), "cudaMalloc");
    return reinterpret_cast<uintptr_t>(p);
}

uintptr_t host_alloc(size_t nbytes) {
    void* p = nullptr;
    check(cudaHostAlloc(&p, nbytes ? nbytes : 1, cudaHostAllocPortable), "cudaHostAlloc");
    return reinterpret_cast<uintptr_t>(p);
}

uintptr_t stream_create() {
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    return reinterpret_cast<uintptr_t>(s);
}

void stream_synchronize(uintptr_t stream) {
    cudaError_t err;
    {
        nb::gil_scoped_release release;
        err = cudaStreamSynchronize(stream_of(stream));
    }
    check(err, "cudaStreamSynchronize");
}

// The capture ends even when it fails (an invalidated one yields no graph), and a caller may go on without a
// graph (the TensorRT backend does). CUDA also keeps the failure as this thread's last error, which the next
// cudaGetLastError on the thread (the int8 GEMM's launch check) would report as its own; it is cleared once
// raised here, as NVIDIA's trtexec does after a failed capture.
uintptr_t graph_end_capture(uintptr_t stream) {
    cudaGraph_t graph = nullptr;
    cudaError_t err = cudaStreamEndCapture(stream_of(stream), &graph);
    if (err != cudaSuccess) {
        if (graph != nullptr) cudaGraphDestroy(graph);
        cudaGetLastError();
        check(err, "cudaStreamEndCapture");
    }
    cudaGraphExec_t exec = nullptr;
    err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (err != cudaSuccess) cudaGetLastError();
    check(err, "cudaGraphInstantiate");
    return reinterpret_cast<uintptr_t>(exec);
}

void gemm_s8(uintptr_t a, uintptr_t bt, uintptr_t c, int m, int n, int k, const std::string& algo, uintptr_t stream) {
    if (algo != "dp4a" && algo != "mma") throw std::invalid_argument("algo must be 'dp4a' or 'mma'");
    const auto kind = algo == "mma" ? tidal::cuda::Algo::mma : tidal::cuda::Algo::dp4a;
    const char* err = tidal::cuda::gemm_s8s8_s32(ptr<const int8_t>(a), ptr<const int8_t>(bt), ptr<int32_t>(c), m, n, k,
                                                  kind, ptr<void>(stream));
    if (err != nullptr) throw std::runtime_error(err);
}

}  // namespace

void bind_cuda_runtime(nb::module_& m) {
    m.def("cuda_device_count", &device_count, "Visible CUDA devices; 0 without a driver or device.");
    m.def("cuda_set_device", [](int device) { check(cudaSetDevice(device), "cudaSetDevice"); }, "device"_a,
          "Make `device` current for this thread (every later call on the thread uses it).");
    m.def("cuda_malloc", &device_alloc, "nbytes"_a, "Device memory; returns its address.");
    m.def("cuda_free", [](uintptr_t p) { check(cudaFree(ptr<void>(p)), "cudaFree"); }, "ptr"_a);
    m.def("cuda_host_alloc", &host_alloc, "nbytes"_a, "Page-locked host memory (copies overlap compute).");
    m.def("cuda_free_host", [](uintptr_t p) { check(cudaFreeHost(ptr<void>(p)), "cudaFreeHost"); }, "ptr"_a);
    m.def("cuda_stream_create", &stream_create, "A non-blocking stream; returns its handle.");
    m.def("cuda_stream_destroy", [](uintptr_t s) { check(cudaStreamDestroy(stream_of(s)), "cudaStreamDestroy"); },
          "stream"_a);
    m.def("cuda_stream_synchronize", &stream_synchronize, "stream"_a, "Wait (GIL released) for the stream's work.");
    m.def(
        "cuda_memcpy_async",
        [](uintptr_t dst, uintptr_t src, size_t nbytes, uintptr_t stream) {
            check(cudaMemcpyAsync(ptr<void>(dst), ptr<const void>(src), nbytes, cudaMemcpyDefault, stream_of(stream)),
                  "cudaMemcpyAsync");
        },
        "dst"_a, "src"_a, "nbytes"_a, "stream"_a, "Copy between any two addresses (unified addressing) on `stream`.");
    m.def(
        "cuda_graph_begin_capture",
        [](uintptr_t s) {
            check(cudaStreamBeginCapture(stream_of(s), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
        },
        "stream"_a, "Record the work queued on `stream` from now on instead of running it.");
    m.def("cuda_graph_end_capture", &graph_end_capture, "stream"_a, "End the capture; an executable graph's handle.");
    m.def(
        "cuda_graph_launch",
        [](uintptr_t exec, uintptr_t s) {
            check(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(exec), stream_of(s)), "cudaGraphLaunch");
        },
        "graph"_a, "stream"_a);
    m.def(
        "cuda_graph_destroy",
        [](uintptr_t exec) {
            check(cudaGraphExecDestroy(reinterpret_cast<cudaGraphExec_t>(exec)), "cudaGraphExecDestroy");
        },
        "graph"_a);
    m.def("cuda_gemm_s8_ptr", &gemm_s8, "a"_a, "bt"_a, "c"_a, "m"_a, "n"_a, "k"_a, "algo"_a, "stream"_a,
          "c = a @ bt.T on device addresses (int8 M x K, int8 N x K, int32 M x N), queued on `stream`.");
}
