// GEMM of a few rows against a weight stored as column panels: C = A @ B (+ bias) (+ R), B packed as
// (N / 16, K, 16), so that one panel (16 columns) is K consecutive 64-byte rows and the whole weight is read
// once, front to back (csrc/cpu/panel_linear.cpp splits the panels across threads in contiguous ranges).
//
// This is the shape of the UNet's deepest levels at batch 1 (16-64 rows against a 1-5 MB weight), which are
// bound by how fast the weight comes from memory: with the weight in a row-major or blocked layout a GEMM
// kernel walks it panel by panel at a stride the hardware prefetcher does not follow across pages, and lets
// memory and arithmetic wait on each other. Here each panel row is one cache line in address order, and software
// prefetches run a page (and two pages more into L2) ahead of the loads, so the next panels stream in while
// this one is multiplied.
#include <algorithm>

#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

namespace {

constexpr int kPanel = 16;           // columns per panel (one AVX-512 vector, two AVX2 ones)
constexpr int kNV = kPanel / kV;     // vectors per panel row
// Rows per register block: R x kNV accumulators plus one panel row and a broadcast within the register file
// (32 zmm / 16 ymm).
constexpr int kRows = kNV == 1 ? 16 : 6;
// Prefetch distances in floats ahead of the panel row being read: one page into L1, two more into L2.
constexpr int64_t kPrefetchL1 = 1024, kPrefetchL2 = 3072;

// The K loop runs in chunks of kChunk, each summed in registers and then added to the block's running total (on
// the stack): error grows with kChunk + K / kChunk instead of K, as in a blocked GEMM (K reaches 4608 here).
constexpr int64_t kChunk = 256;

template <int R, bool PF>
inline void block(const float* A, int64_t lda, const float* Bp, int64_t K, float* C, int64_t ldc, const float* bias,
                  const float* Rm, int64_t ldr) {
  alignas(64) float total[R * kPanel] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    Vec acc[R][kNV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kNV; ++v) acc[r][v] = Vec(0.f);
    const int64_t k1 = std::min(K, k0 + kChunk);
    for (int64_t k = k0; k < k1; ++k) {
      const float* b = Bp + k * kPanel;
      if (PF) {
        __builtin_prefetch(b + kPrefetchL1, 0, 3);
        __builtin_prefetch(b + kPrefetchL2, 0, 2);
      }
      Vec bv[kNV];
      for (int v = 0; v < kNV; ++v) bv[v] = Vec::loadu(b + v * kV);
      for (int r = 0; r < R; ++r) {
        const Vec a(A[r * lda + k]);
        for (int v = 0; v < kNV; ++v) acc[r][v] = simd::fmadd(a, bv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kNV; ++v) {
        float* t = total + r * kPanel + v * kV;
        (Vec::loadu(t) + acc[r][v]).store(t);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kNV; ++v) {
      Vec y = Vec::loadu(total + r * kPanel + v * kV);
      if (bias) y = y + Vec::loadu(bias + v * kV);
      if (Rm) y = y + Vec::loadu(Rm + r * ldr + v * kV);
      y.store(C + r * ldc + v * kV);
    }
}

// Rows [0, rows) of one panel, rows < kRows.
template <bool PF>
inline void block_tail(int rows, const float* A, int64_t lda, const float* Bp, int64_t K, float* C, int64_t ldc,
                       const float* bias, const float* Rm, int64_t ldr) {
  switch (rows) {
#define DDPM_FAST_PANEL_CASE(n) \
  case n: if constexpr (n < kRows) block<n, PF>(A, lda, Bp, K, C, ldc, bias, Rm, ldr); break;
    DDPM_FAST_PANEL_CASE(1) DDPM_FAST_PANEL_CASE(2) DDPM_FAST_PANEL_CASE(3) DDPM_FAST_PANEL_CASE(4)
    DDPM_FAST_PANEL_CASE(5) DDPM_FAST_PANEL_CASE(6) DDPM_FAST_PANEL_CASE(7) DDPM_FAST_PANEL_CASE(8)
    DDPM_FAST_PANEL_CASE(9) DDPM_FAST_PANEL_CASE(10) DDPM_FAST_PANEL_CASE(11) DDPM_FAST_PANEL_CASE(12)
    DDPM_FAST_PANEL_CASE(13) DDPM_FAST_PANEL_CASE(14) DDPM_FAST_PANEL_CASE(15)
#undef DDPM_FAST_PANEL_CASE
    default: break;
  }
}

}  // namespace

void panel_gemm_kernel(const float* A, int64_t lda, const float* Bp, int64_t K, float* C, int64_t ldc,
                       const float* bias, const float* R, int64_t ldr, int64_t M, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = Bp + p * K * kPanel;
    const int64_t j = p * kPanel;
    const float* pb = bias ? bias + j : nullptr;
    // The first row block pulls the panel from memory (prefetching ahead); later ones re-read it from L1 / L2.
    int64_t r = 0;
    for (bool first = true; r < M; first = false) {
      const int64_t rows = std::min<int64_t>(kRows, M - r);
      const float* a = A + r * lda;
      float* c = C + r * ldc + j;
      const float* rm = R ? R + r * ldr + j : nullptr;
      if (rows == kRows) {
        if (first) block<kRows, true>(a, lda, panel, K, c, ldc, pb, rm, ldr);
        else block<kRows, false>(a, lda, panel, K, c, ldc, pb, rm, ldr);
      } else if (first) {
        block_tail<true>(int(rows), a, lda, panel, K, c, ldc, pb, rm, ldr);
      } else {
        block_tail<false>(int(rows), a, lda, panel, K, c, ldc, pb, rm, ldr);
      }
      r += rows;
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
