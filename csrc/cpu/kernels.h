// Raw-pointer CPU kernels, compiled once per instruction set (csrc/cpu/kernels/*.cpp, see CMakeLists.txt)
// and chosen at run time by ddpm_fast::cpu::kernels(). Only plain pointers and the torch-free types of
// kernel_types.h cross this boundary, so the ISA-specific objects include no torch header (and no AVX2 code
// ends up in an inline function shared with the baseline build).
#pragma once
#include <cstdint>

#include "kernel_types.h"

namespace ddpm_fast::cpu {

using ddpm_fast::DType;
using ddpm_fast::StepCoefs;

struct Kernels {
  const char* isa;
  // scheduler step on n contiguous elements.
  void (*scheduler_step)(DType, const void* eps, const void* x, const void* noise, void* prev, void* x0,
                         int64_t n, const StepCoefs&);
  // Per-row mean (= shift + off) and M2 (sum of squared deviations, two-pass) of rows [r0, r1) of length len.
  void (*row_stats)(DType, const void* x, int64_t len, int64_t r0, int64_t r1, float* shift, float* off, float* m2);
  // Per-column mean (= ref + off) and M2 (around that mean) over p rows of c columns (channels-last pixels x
  // channels); ref is a caller-chosen per-column value near the data (keeps |mean| >> std exact).
  void (*col_stats)(DType, const void* x, int64_t p, int64_t c, const float* ref, float* off, float* m2);
  // y = (x - hi[r]) * a[r] + b[r] (then SiLU) for rows [r0, r1) of length len.
  void (*row_affine)(DType, const void* x, void* y, int64_t len, int64_t r0, int64_t r1, const float* hi,
                     const float* a, const float* b, bool silu);
  // y = (x - hi) * a + b per column (then SiLU) over p rows of c columns; rows ldx (x) and ldy (y) elements
  // apart (ldy > c: these are some of y's channels).
  void (*col_affine)(DType, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t p, int64_t c,
                     const float* hi, const float* a, const float* b, bool silu);
  // In place, for `rows` rows of n scores (row stride ld): s = softmax(scale * s) along the row.
  void (*softmax_rows)(float* s, int64_t rows, int64_t n, int64_t ld, float scale);
  // Winograd F(tile x tile, 3x3), tile 2 or 4, fp32 channels-last (N, H, W, C) images cut into
  // tiles_h x tiles_w tiles of tile x tile outputs per image; tiles [t0, t1) go to / come from rows 0.. of
  // (tile + 2)^2 planes. Input: V[k * ldv + (t - t0) * C + c].
  void (*winograd_input)(const float* x, float* V, int64_t H, int64_t W, int64_t C, int64_t tiles_h,
                         int64_t tiles_w, int64_t t0, int64_t t1, int64_t ldv, int tile);
  // For each of `planes` planes k: M[k * ldm + r * ldr + j] = sum_c V[k * ldv + r * C + c] * U[k * ldu + c * O + j]
  // for rows r < rows, columns j < oc (U already offset to the first column). Single-threaded, register-blocked;
  // nullptr in builds without a fast one (DEFAULT), where the glue uses torch's batched GEMM instead.
  void (*winograd_gemm)(const float* V, int64_t ldv, int64_t C, const float* U, int64_t ldu, int64_t O, float* M,
                        int64_t ldm, int64_t ldr, int64_t rows, int64_t oc, int planes);
  // y = A^T m A + bias (+ residual at the same NHWC place), then SiLU, then * inv_scale, for channels [0, oc) of
  // y, bias and residual (pointers already offset to the first channel; O is their pixel stride) from
  // m[k] = M[k * ldm + (t - t0) * ldr + j]; y is (N, H, W, O).
  void (*winograd_output)(const float* M, int64_t ldm, int64_t ldr, float* y, const float* bias,
                          const float* residual, int64_t H, int64_t W, int64_t O, int64_t oc, int64_t tiles_h,
                          int64_t tiles_w, int64_t t0, int64_t t1, bool silu, float inv_scale, int tile);
  // C[r * ldc + j] = sum_k A[r * lda + k] * W[j][k] (+ bias[j]) (+ R[r * ldr + j]) for rows r < M and the
  // columns j of panels [p0, p1), W packed as (N / 16, K, 16) column panels (bias / R nullable).
  void (*panel_gemm)(const float* A, int64_t lda, const float* Wp, int64_t K, float* C, int64_t ldc,
                     const float* bias, const float* R, int64_t ldr, int64_t M, int64_t p0, int64_t p1);
  // C (rows x cols, row stride ldc) = A (rows x K, row stride lda) @ B (K x cols, row stride ldb): the GEMM behind
  // winograd_gemm. Single-threaded; nullptr where winograd_gemm is.
  void (*gemm)(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
               int64_t K, int64_t cols);
};

#define DDPM_FAST_DECLARE_ISA(NS) \
  namespace NS {                  \
  const Kernels& table();         \
  }
DDPM_FAST_DECLARE_ISA(DEFAULT)
DDPM_FAST_DECLARE_ISA(AVX2)
DDPM_FAST_DECLARE_ISA(AVX512)
#undef DDPM_FAST_DECLARE_ISA

// The best table this CPU supports (DDPM_FAST_CPU_ISA=default|avx2|avx512 forces one, for testing).
const Kernels& kernels();

// Whether torch's own CPU GEMM runs AVX-512 kernels here. torch's x86 builds do their GEMMs in MKL, which takes its
// AVX-512 kernels on Intel CPUs only; on AMD's (Zen 4 / 5) it runs AVX2 ones, under half the rate of the AVX-512
// table's GEMM there (bench/results/cpu-amd-epyc-avx512/). Where this is false and the table has a GEMM, the
// Winograd planes and the attention's products use ours at every size.
bool torch_gemm_avx512();

}  // namespace ddpm_fast::cpu
