// Op schemas for the ddpm_fast namespace (all of them, in one place) and the pybind11 module ddpm_fast._C
// that loads them together with the CPU kernels. Each kernel family registers its CPU implementation in
// csrc/cpu/<op>.cpp (this library) and its CUDA one in csrc/cuda/<op>.cu (libddpm_fast_cuda.so, loaded by
// ddpm_fast._native only when the running torch has CUDA).
//
// Every schema below is registered through the LibTorch stable ABI (stable_compat.h), so this library loads
// on any torch >= the target version it reports.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/kernels.h"
#include "cpu/pool.h"
#include "kernel_limits.h"
#include "stable_compat.h"

STABLE_TORCH_LIBRARY(ddpm_fast, m) {
  // SiLU(GroupNorm(x + temb[:, :, None, None]) * weight + bias); silu=false gives the norm alone.
  // x is (N, C, H, W) (CUDA also takes (N, C, ...)); the output keeps x's memory format (channels_last or
  // contiguous). weight, bias (C,) and temb (N, C) may be any float dtype.
  m.def("group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, Tensor? temb, bool silu) -> Tensor");
  // group_norm_silu(cat([x, skip], dim=1), ...) without the concatenation (CPU only): x (N, C1, H, W) and skip
  // (N, C2, H, W) of one dtype; weight, bias (C1 + C2,). The output takes x's memory format.
  m.def("group_norm_silu_cat(Tensor x, Tensor skip, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu) -> Tensor");
  // softmax(q k^T * scale) v for q (B, H, L, D) or (B, L, D), k (.., S, D), v (.., S, Dv); scale defaults to
  // 1/sqrt(D). Returns (B, H, L, Dv) (or (B, L, Dv)), contiguous, in q's dtype.
  m.def("attention(Tensor q, Tensor k, Tensor v, float? scale) -> Tensor");
  // 3x3 / stride 1 / padding 1 convolution by Winograd F(2x2, 3x3) or F(4x4, 3x3), fp32, CPU only; weight is
  // (16 or 36, C_in, C_out) from ddpm_fast.ops.winograd_weight, or its (16 or 36, C_out / 16, C_in, 16) column
  // panels (winograd_weight(..., panels=True), for few tiles). y = conv(x) + bias (+ residual), then SiLU,
  // then / output_scale; y is channels_last.
  m.def("conv3x3_winograd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool silu, float output_scale) -> Tensor");
  // x @ W^T + bias (+ other) for fp32 x (M, K) of few rows, CPU only; weight is W (N, K) as (N / 16, K, 16) column
  // panels from ddpm_fast.ops.panel_weight, read once front to back. Returns (M, N), contiguous.
  m.def("panel_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? other) -> Tensor");
  // 3x3 / stride 1 / padding 1 convolution of fp32 x (N, C, H, W) of few pixels as one panel GEMM of its im2col
  // rows, (N*H*W, 9C) in (kh, kw, c) order, CPU only; weight is (C_out / 16, 9C, 16) panels from
  // ddpm_fast.ops.conv3x3_panel_weight. y = conv(x) + bias (+ residual), channels_last.
  m.def("conv3x3_panels(Tensor x, Tensor weight, Tensor? bias, Tensor? residual) -> Tensor");
  // One DDPM/DDIM step, elementwise in fp32: x0 = a_x*sample + a_e*model_output (clamped to +-clip_range when
  // given); prev = c0*x0 + c1*sample + c2*model_output + noise_scale*noise, the noise term skipped when noise
  // is None or noise_scale == 0. Returns (prev, x0), in sample's layout when model_output (and noise, when
  // it is used) share it, else contiguous.
  m.def("scheduler_step(Tensor model_output, Tensor sample, Tensor? noise, float a_x, float a_e, float c0, float c1, float c2, float noise_scale, float? clip_range) -> (Tensor, Tensor)");
  // scheduler_step with its six coefficients read from row index[0] of coefs, a (T, 6) float32 table of
  // (a_x, a_e, c0, c1, c2, noise_scale) rows; index is a one-element int64 tensor; both on sample's device.
  // The row is read on the device (on CUDA by the kernel, with no host sync), so a CUDA graph can replay
  // the step while the caller advances index in place. A noise_scale of 0 in the row skips the noise term
  // (noise may still be given). Outputs take sample's layout when model_output and noise (when given, used
  // or not) share it, else contiguous. An index outside [0, T) raises on the CPU; on CUDA the glue cannot
  // read index without a sync, so the kernel instead fills both outputs with NaN.
  m.def("scheduler_step_table(Tensor model_output, Tensor sample, Tensor? noise, Tensor coefs, Tensor index, float? clip_range) -> (Tensor, Tensor)");
}

namespace {

// TORCH_TARGET_VERSION (torch/headeronly/version.h's encoding: one byte each of major, minor, patch at the
// top of a uint64) as "2.10.0".
std::string target_version() {
  const unsigned long long v = TORCH_TARGET_VERSION;
  return std::to_string((v >> 56) & 0xFF) + "." + std::to_string((v >> 48) & 0xFF) + "." +
         std::to_string((v >> 40) & 0xFF);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  // The torch whose headers this build used, and the oldest torch it loads on (TORCH_TARGET_VERSION).
  mod.attr("torch_version") = DDPM_FAST_TORCH_VERSION;
  mod.attr("target_version") = target_version();
  // The CUDA kernels' library built next to this one (a file name in this package; "" when none was built)
  // and the CUDA version it was compiled with ("" without).
  mod.attr("cuda_library") = DDPM_FAST_CUDA_LIBRARY;
  mod.attr("cuda_version") = DDPM_FAST_CUDA_VERSION;
  mod.attr("with_cuda") = std::string(DDPM_FAST_CUDA_LIBRARY).empty() ? false : true;
  // Limits of the kernels (csrc/kernel_limits.h), so that Python never repeats them.
  pybind11::dict limits;
  limits["cuda_attention_max_head_dim"] = ddpm_fast::limits::kCudaAttentionMaxHeadDim;
  limits["cuda_group_norm_max_channels_per_group"] = ddpm_fast::limits::kCudaGroupNormMaxChannelsPerGroup;
  mod.attr("limits") = limits;
  // Which CPU kernel build runs here ("AVX512", "AVX2" or "DEFAULT"); DDPM_FAST_CPU_ISA can force one.
  mod.def("cpu_isa", [] { return std::string(ddpm_fast::cpu::kernels().isa); });
  // Whether torch's CPU GEMM has AVX-512 kernels here (MKL on an Intel CPU): which GEMM the Winograd planes use.
  mod.def("torch_gemm_avx512", [] { return ddpm_fast::cpu::torch_gemm_avx512(); });
  // The CPU kernels' memory pool (csrc/cpu/pool.cpp): its counters, freeing what it caches, and its limit.
  mod.def("cpu_pool_stats", [] {
    const ddpm_fast::cpu::PoolStats s = ddpm_fast::cpu::pool_stats();
    pybind11::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["live_bytes"] = s.live_bytes;
    d["limit_bytes"] = s.limit_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  });
  mod.def("cpu_pool_release_cached", [] { ddpm_fast::cpu::pool_release_cached(); });
  mod.def("cpu_pool_set_limit", [](int64_t bytes) { ddpm_fast::cpu::pool_set_limit(bytes); });
}
