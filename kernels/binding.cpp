// tidal._kernels: the only Python-facing file. Validates every argument (dtype, rank, contiguity,
// shapes, ranges) before any kernel runs, so bad input raises TypeError/ValueError instead of crashing,
// and releases the GIL around the arithmetic.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <time.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "chain.h"
#include "gemm.h"
#include "thread_pool.h"
#ifdef TIDAL_WITH_CUDA
#include "cuda/gemm_int8.h"
#include "cuda/runtime_binding.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <class T, class Ndim>
using HostArray = nb::ndarray<const T, Ndim, nb::c_contig, nb::device::cpu>;
using U8Matrix = HostArray<uint8_t, nb::ndim<2>>;
using S8Matrix = HostArray<int8_t, nb::ndim<2>>;
using F32Matrix = HostArray<float, nb::ndim<2>>;
using F32Vector = HostArray<float, nb::ndim<1>>;
using S32Vector = HostArray<int32_t, nb::ndim<1>>;
using Mid = std::pair<float, int>;

constexpr int64_t kMaxK = 16384;  // keeps every int32 partial sum (K * 255 * 255) below 2^31

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

tidal::Isa parse_isa(const std::optional<std::string>& name) {
    if (!name) return tidal::best_isa();
    tidal::Isa isa;
    require(tidal::isa_from_name(name->c_str(), &isa), "unknown isa '" + *name + "'");
    require(tidal::isa_compiled(isa), "isa '" + *name + "' was not compiled into this build");
    require(tidal::cpu_supports(isa), "this CPU cannot execute isa '" + *name + "'");
    return isa;
}

void require_scale(float s, const char* what) {
    require(std::isfinite(s) && s > 0.f, std::string(what) + " must be a positive finite number");
}

void require_zero_point(int z, const char* what) {
    require(z >= 0 && z <= 255, std::string(what) + " must lie in [0, 255] (u8 domain)");
}

void require_columns(const std::optional<F32Vector>& v, int64_t n, const char* what) {
    if (v) {
        require(static_cast<int64_t>(v->shape(0)) == n, std::string(what) + " must have one value per output column");
    }
}

template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<2>> new_matrix(int64_t rows, int64_t cols, T** data) {
    *data = new T[static_cast<size_t>(rows * cols > 0 ? rows * cols : 1)];
    nb::capsule owner(*data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T, nb::ndim<2>>(*data, {static_cast<size_t>(rows), static_cast<size_t>(cols)}, owner);
}

tidal::PackedWeights pack(S8Matrix b, std::optional<S32Vector> zero_points, std::optional<std::string> isa,
                          bool transposed) {
    const int64_t k = static_cast<int64_t>(transposed ? b.shape(1) : b.shape(0));
    const int64_t n = static_cast<int64_t>(transposed ? b.shape(0) : b.shape(1));
    require(k > 0 && n > 0, "weights must not be empty");
    require(k <= kMaxK, "K above 16384 could overflow the int32 accumulators");
    if (zero_points) {
        require(static_cast<int64_t>(zero_points->shape(0)) == n, "zero_points must have one value per column");
        for (int64_t i = 0; i < n; ++i) {
            const int32_t z = zero_points->data()[i];
            require(z >= -128 && z <= 127, "weight zero points must lie in [-128, 127]");
        }
    }
    const tidal::Isa chosen = parse_isa(isa);
    const int32_t* zp = zero_points ? zero_points->data() : nullptr;
    nb::gil_scoped_release release;
    return tidal::pack_weights(b.data(), k, n, transposed, zp, chosen);
}

// Shared by the three gemm entry points: checks A against the weights and runs the product.
template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<2>> run_gemm(U8Matrix a, const tidal::PackedWeights& w, int a_zero_point,
                                                 tidal::Epilogue ep, int threads) {
    require(static_cast<int64_t>(a.shape(1)) == w.k,
            "a has " + std::to_string(a.shape(1)) + " columns but the weights have K = " + std::to_string(w.k));
    require_zero_point(a_zero_point, "a_zero_point");
    require(threads >= 0, "threads must be >= 0 (0: all cores)");
    const int64_t m = static_cast<int64_t>(a.shape(0));
    T* data = nullptr;
    auto out = new_matrix<T>(m, w.n, &data);
    tidal::GemmArgs args;
    args.a = a.data();
    args.m = m;
    args.lda = w.k;
    args.a_zero_point = a_zero_point;
    args.w = &w;
    args.ep = ep;
    args.out = data;
    {
        nb::gil_scoped_release release;
        tidal::gemm(args, threads);
    }
    return out;
}

tidal::Epilogue float_epilogue(const tidal::PackedWeights& w, F32Vector scale, const std::optional<F32Vector>& bias,
                               bool relu, const std::optional<Mid>& mid) {
    require(static_cast<int64_t>(scale.shape(0)) == w.n, "scale must have one value per output column");
    require_columns(bias, w.n, "bias");
    tidal::Epilogue ep;
    ep.scale = scale.data();
    ep.bias = bias ? bias->data() : nullptr;
    ep.lower = relu ? 0.f : -INFINITY;
    if (mid) {
        require_scale(mid->first, "mid scale");
        require_zero_point(mid->second, "mid zero point");
        ep.has_mid = true;
        ep.mid_scale = mid->first;
        ep.mid_zero_point = static_cast<float>(mid->second);
    }
    return ep;
}

std::vector<std::string> runnable_isas() {
    std::vector<std::string> names;
    for (tidal::Isa isa : {tidal::Isa::avx512_vnni, tidal::Isa::avx_vnni, tidal::Isa::avx2, tidal::Isa::scalar})
        if (tidal::isa_compiled(isa) && tidal::cpu_supports(isa)) names.emplace_back(tidal::isa_name(isa));
    return names;
}

// CPU time of the calling thread, so a core shared with other processes still reads its own throughput.
double thread_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double peak_gops(const std::string& name, double seconds) {
    const tidal::Isa isa = parse_isa(name);
    require(isa != tidal::Isa::scalar, "peak_gops measures the SIMD ISAs only");
    require(seconds > 0 && seconds <= 10, "seconds must lie in (0, 10]");
    auto loop = isa == tidal::Isa::avx512_vnni ? tidal::peak_loop_avx512_vnni
                : isa == tidal::Isa::avx_vnni  ? tidal::peak_loop_avx_vnni
                                               : tidal::peak_loop_avx2;
    nb::gil_scoped_release release;
    loop(1 << 20);  // warm up clocks
    int64_t ops = 0;
    const double start = thread_seconds();
    double elapsed = 0;
    while (elapsed < seconds) {
        ops += loop(1 << 20);
        elapsed = thread_seconds() - start;
    }
    return static_cast<double>(ops) / elapsed / 1e9;
}

// The layers point into PackedWeights objects; nb::keep_alive on add_layer keeps them alive with the chain.
struct PyChain {
    tidal::Chain chain;
};

tidal::OutKind parse_output(const std::string& output) {
    if (output == "u8") return tidal::OutKind::u8;
    if (output == "f32") return tidal::OutKind::f32;
    if (output == "dequantize") return tidal::OutKind::dq;
    throw std::invalid_argument("output must be 'u8', 'f32' or 'dequantize'");
}

void add_layer(PyChain& self, const tidal::PackedWeights& w, F32Vector scale, int a_zero_point,
               std::optional<F32Vector> bias, bool relu, std::optional<Mid> mid, std::optional<Mid> out,
               const std::string& output) {
    const auto& layers = self.chain.layers();
    if (!layers.empty()) {
        require(layers.back().ep.kind == tidal::OutKind::u8, "only the last layer may produce a float output");
        require(layers.back().w->n == w.k, "layer K = " + std::to_string(w.k) + " does not match the previous N = " +
                                               std::to_string(layers.back().w->n));
    }
    require_zero_point(a_zero_point, "a_zero_point");
    tidal::ChainLayer layer;
    layer.ep = float_epilogue(w, scale, bias, relu, mid);
    layer.ep.kind = parse_output(output);
    require((layer.ep.kind == tidal::OutKind::f32) == !out,
            "out=(scale, zero_point) is required unless output is 'f32'");
    if (out) {
        require_scale(out->first, "out scale");
        require_zero_point(out->second, "out zero point");
        layer.ep.out_scale = out->first;
        layer.ep.out_zero_point = static_cast<float>(out->second);
    }
    layer.w = &w;
    layer.a_zero_point = a_zero_point;
    layer.scale.assign(scale.data(), scale.data() + w.n);
    if (bias) layer.bias.assign(bias->data(), bias->data() + w.n);
    layer.col_terms = tidal::column_terms(w, a_zero_point);
    self.chain.add(std::move(layer));
}

nb::object run_chain(const PyChain& self, F32Matrix x, int threads) {
    const auto& layers = self.chain.layers();
    require(!layers.empty(), "the chain has no layers");
    const int64_t k = layers.front().w->k;
    require(static_cast<int64_t>(x.shape(1)) == k, "x must have K = " + std::to_string(k) + " columns");
    require(threads >= 0, "threads must be >= 0 (0: all cores)");
    const int64_t m = static_cast<int64_t>(x.shape(0)), n = layers.back().w->n;
    void* data = nullptr;
    nb::object result;
    if (layers.back().ep.kind == tidal::OutKind::u8) {
        uint8_t* p = nullptr;
        result = nb::cast(new_matrix<uint8_t>(m, n, &p));
        data = p;
    } else {
        float* p = nullptr;
        result = nb::cast(new_matrix<float>(m, n, &p));
        data = p;
    }
    nb::gil_scoped_release release;
    self.chain.run(x.data(), m, data, threads);
    return result;
}

#ifdef TIDAL_WITH_CUDA
template <class T>
using DeviceMatrix = nb::ndarray<T, nb::ndim<2>, nb::c_contig, nb::device::cuda>;

void cuda_gemm(DeviceMatrix<const int8_t> a, DeviceMatrix<const int8_t> bt, DeviceMatrix<int32_t> out,
               const std::string& algo) {
    require(a.shape(1) == bt.shape(1), "a and bt must share K (bt is N x K)");
    require(out.shape(0) == a.shape(0) && out.shape(1) == bt.shape(0), "out must be M x N");
    require(a.device_id() == bt.device_id() && a.device_id() == out.device_id(), "arrays must share one device");
    require(algo == "dp4a" || algo == "mma", "algo must be 'dp4a' or 'mma'");
    const auto kind = algo == "mma" ? tidal::cuda::Algo::mma : tidal::cuda::Algo::dp4a;
    const char* err = nullptr;
    {
        nb::gil_scoped_release release;
        err = tidal::cuda::gemm_s8s8_s32(a.data(), bt.data(), out.data(), static_cast<int>(a.shape(0)),
                                         static_cast<int>(bt.shape(0)), static_cast<int>(a.shape(1)), kind, nullptr);
    }
    if (err != nullptr) throw std::runtime_error(err);
}
#endif

}  // namespace

NB_MODULE(_kernels, m) {
    m.doc() = "tidal's int8 CPU (and optional CUDA) kernels; use through tidal.backends.int8.";

    nb::class_<tidal::PackedWeights>(
        m, "PackedWeights", "Int8 weights packed once for one ISA; immutable and safe to share across threads.")
        .def("__init__",
             [](tidal::PackedWeights* self, S8Matrix b, std::optional<S32Vector> zero_points,
                std::optional<std::string> isa, bool transposed) {
                 new (self) tidal::PackedWeights(pack(b, zero_points, isa, transposed));
             },
             "weights"_a.noconvert(), "zero_points"_a.noconvert() = nb::none(), "isa"_a = nb::none(),
             "transposed"_a = false,
             "Pack a K x N int8 matrix (N x K when transposed); zero_points are per output column.")
        .def_prop_ro("k", [](const tidal::PackedWeights& w) { return w.k; })
        .def_prop_ro("n", [](const tidal::PackedWeights& w) { return w.n; })
        .def_prop_ro("isa", [](const tidal::PackedWeights& w) { return std::string(tidal::isa_name(w.isa)); })
        .def_prop_ro("nbytes", [](const tidal::PackedWeights& w) { return static_cast<int64_t>(w.data.size()); })
        .def_prop_ro("widened", [](const tidal::PackedWeights& w) { return w.widened; },
                     "True when AVX2 runs these weights on its exact 8-bit (vpmaddwd) path: some |w| > 64.")
        .def("__repr__", [](const tidal::PackedWeights& w) {
            return "PackedWeights(k=" + std::to_string(w.k) + ", n=" + std::to_string(w.n) + ", isa='" +
                   tidal::isa_name(w.isa) + "')";
        });

    m.def(
        "gemm_s32",
        [](U8Matrix a, const tidal::PackedWeights& w, int a_zero_point, int threads) {
            return run_gemm<int32_t>(a, w, a_zero_point, tidal::Epilogue{}, threads);
        },
        "a"_a.noconvert(), "w"_a, "a_zero_point"_a = 0, "threads"_a = 0,
        "sum_k (a - a_zero_point) * (w - w_zero_point) as an M x N int32 matrix.");
    m.def(
        "gemm_f32",
        [](U8Matrix a, const tidal::PackedWeights& w, F32Vector scale, int a_zero_point, std::optional<F32Vector> bias,
           bool relu, std::optional<Mid> mid, int threads) {
            tidal::Epilogue ep = float_epilogue(w, scale, bias, relu, mid);
            ep.kind = tidal::OutKind::f32;
            return run_gemm<float>(a, w, a_zero_point, ep, threads);
        },
        "a"_a.noconvert(), "w"_a, "scale"_a.noconvert(), "a_zero_point"_a = 0, "bias"_a.noconvert() = nb::none(),
        "relu"_a = false, "mid"_a = nb::none(), "threads"_a = 0,
        "Dequantized product: acc * scale[n], optionally rounded through mid=(scale, zero_point), plus bias, ReLU.");
    m.def(
        "gemm_u8",
        [](U8Matrix a, const tidal::PackedWeights& w, F32Vector scale, float out_scale, int out_zero_point,
           int a_zero_point, std::optional<F32Vector> bias, bool relu, std::optional<Mid> mid, int threads) {
            require_scale(out_scale, "out_scale");
            require_zero_point(out_zero_point, "out_zero_point");
            tidal::Epilogue ep = float_epilogue(w, scale, bias, relu, mid);
            ep.kind = tidal::OutKind::u8;
            ep.out_scale = out_scale;
            ep.out_zero_point = static_cast<float>(out_zero_point);
            return run_gemm<uint8_t>(a, w, a_zero_point, ep, threads);
        },
        "a"_a.noconvert(), "w"_a, "scale"_a.noconvert(), "out_scale"_a, "out_zero_point"_a, "a_zero_point"_a = 0,
        "bias"_a.noconvert() = nb::none(), "relu"_a = false, "mid"_a = nb::none(), "threads"_a = 0,
        "Like gemm_f32, then requantized to u8 with out_scale and out_zero_point (the next layer's input).");
    m.def(
        "quantize_u8",
        [](F32Matrix x, float scale, int zero_point) {
            require_scale(scale, "scale");
            require_zero_point(zero_point, "zero_point");
            const int64_t rows = static_cast<int64_t>(x.shape(0)), cols = static_cast<int64_t>(x.shape(1));
            uint8_t* data = nullptr;
            auto out = new_matrix<uint8_t>(rows, cols, &data);
            nb::gil_scoped_release release;
            tidal::quantize_u8(x.data(), rows, cols, scale, zero_point, data, cols);
            return out;
        },
        "x"_a.noconvert(), "scale"_a, "zero_point"_a,
        "saturate(round_half_even(x / scale) + zero_point) as u8.");
    nb::class_<PyChain>(m, "Chain",
                        "A quantized MLP run in one call: quantize, then each layer's GEMM and epilogue in turn.")
        .def(
            "__init__",
            [](PyChain* self, float input_scale, int input_zero_point) {
                require_scale(input_scale, "input_scale");
                require_zero_point(input_zero_point, "input_zero_point");
                new (self) PyChain{tidal::Chain(input_scale, input_zero_point)};
            },
            "input_scale"_a, "input_zero_point"_a)
        .def("add_layer", &add_layer, "weights"_a, "scale"_a.noconvert(), "a_zero_point"_a,
             "bias"_a.noconvert() = nb::none(), "relu"_a = false, "mid"_a = nb::none(), "out"_a = nb::none(),
             "output"_a = "u8", nb::keep_alive<1, 2>(),
             "Append a layer; output is 'u8' (requantized with out), 'f32', or 'dequantize' (rounded through out).")
        .def("run", &run_chain, "x"_a.noconvert(), "threads"_a = 0,
             "Run the whole chain on M x K float32 rows; float32 or uint8 M x N by the last layer's output.")
        .def("__len__", [](const PyChain& self) { return self.chain.layers().size(); });
    m.def("isas", &runnable_isas, "ISAs this build and CPU can run, fastest first ('scalar' is for tests).");
    m.def("best_isa", [] { return std::string(tidal::isa_name(tidal::best_isa())); },
          "The ISA chosen at load when none is forced.");
    m.def("usable_cores", &tidal::usable_cores);
    m.def("peak_gops", &peak_gops, "isa"_a, "seconds"_a = 0.2,
          "Billions of int8 operations per second of thread CPU time in a register-only loop of the ISA's "
          "multiply-add (vpdpbusd; on avx2 vpmaddubsw + vpmaddwd + vpaddd): one core's ceiling.");
#ifdef TIDAL_WITH_CUDA
    m.attr("HAS_CUDA") = true;
    m.def("cuda_device_sm", &tidal::cuda::device_sm, "Compute capability * 10 of the current device; 0 if none.");
    m.def("cuda_gemm_s8", &cuda_gemm, "a"_a, "bt"_a, "out"_a, "algo"_a = "mma",
          "out = a @ bt.T on the GPU (int8 in, int32 out, K % 4 == 0), on the default stream, asynchronously.");
    bind_cuda_runtime(m);
#else
    m.attr("HAS_CUDA") = false;
#endif
}
