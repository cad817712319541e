// Op schemas for the ddpm_fast namespace (all of them, in one place) and the pybind11 module that
// loads them. Each kernel family registers its CPU / CUDA implementation in its own source file.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(ddpm_fast, m) {
  // SiLU(GroupNorm(x + temb[:, :, None, None]) * weight + bias); silu=false gives the norm alone.
  m.def("group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, Tensor? temb, bool silu) -> Tensor");
  // softmax(q k^T * scale) v for (B, H, S, D); scale defaults to 1/sqrt(D).
  m.def("attention(Tensor q, Tensor k, Tensor v, float? scale) -> Tensor");
  // x0 = a_x*sample + a_e*model_output (clamped to +-clip_range when given);
  // prev = c0*x0 + c1*sample + c2*model_output + noise_scale*noise.  Returns (prev, x0).
  // 3x3 / stride 1 / padding 1 convolution by Winograd F(2x2, 3x3) or F(4x4, 3x3); weight is (16 or 36, C_in,
  // C_out) from ddpm_fast.ops.winograd_weight. y = conv(x) + bias (+ residual), then SiLU, then / output_scale.
  m.def("conv3x3_winograd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool silu, float output_scale) -> Tensor");
  m.def("scheduler_step(Tensor model_output, Tensor sample, Tensor? noise, float a_x, float a_e, float c0, float c1, float c2, float noise_scale, float? clip_range) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(_C, mod) {
  mod.attr("torch_version") = DDPM_FAST_TORCH_VERSION;
#ifdef DDPM_FAST_WITH_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
  // Which CPU kernel build runs here ("AVX2" or "DEFAULT"); DDPM_FAST_CPU_ISA can force one.
  mod.def("cpu_isa", [] { return std::string(ddpm_fast::cpu::kernels().isa); });
}
