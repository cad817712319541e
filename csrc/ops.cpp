// Op schemas for the ddpm_fast namespace (all of them, in one place) and the pybind11 module that
// loads them. Kernels register their CPU/CUDA implementations in their own files.
#include <torch/library.h>
#include <pybind11/pybind11.h>

TORCH_LIBRARY(ddpm_fast, m) {
  // Placeholder until kernel families are added below.
}

PYBIND11_MODULE(_C, mod) {
  mod.attr("torch_version") = DDPM_FAST_TORCH_VERSION;
#ifdef DDPM_FAST_WITH_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
}
