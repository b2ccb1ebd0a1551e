// Registers the CUDA runtime functions of tidal._kernels (runtime_binding.cpp).
#pragma once

#include <nanobind/nanobind.h>

void bind_cuda_runtime(nanobind::module_& m);
