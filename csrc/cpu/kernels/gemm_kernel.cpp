// The register-blocked fp32 GEMM of the AVX512 build (other builds have none and leave these products to torch's
// GEMM): the Winograd planes' products (csrc/cpu/winograd.cpp) and, where torch's GEMM has no AVX-512 kernels, the
// CPU attention's two products (csrc/cpu/attention.cpp). Single-threaded; the callers split the work.
#include <algorithm>

#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
namespace {

// Register-blocked GEMM (AVX512 only: an AVX2 version with 6 x 16 blocks in 16 ymm registers lost
// to torch's batched GEMM, so that build has none): rows x cols of M = A (rows x K, row stride
// lda) @ B (K x cols, row stride ldb), R = 12 rows and NV = 2 vectors (32 columns) at a time, the 24
// accumulators in zmm registers (24 FMAs per 2 loads of B and 12 broadcasts of A), B read in place (the
// transformed weight, attention's keys or values): one 32-column panel (K x 128 bytes) is reused from L1 by every
// row group. 12 x 32 beat
// 6 x 64, 8 x 48 and 14 x 32 (rates in csrc/README.md).
constexpr int kGemmR = 12, kGemmNV = 2;

// Software prefetch of the next plane's weight chunk (K rows of `len` floats, `skip` floats apart) in memory
// order, kGemmNV lines per K step of the first row group of each panel: over one plane's panels that is the
// chunk's size. The GEMM reads the weight panel by panel (128-byte pieces of rows O * 4 bytes apart), an order
// the L2 streamer does not follow; prefetches walking the next plane sequentially set it going, so that U
// streams from L3 / memory at about the sequential rate instead of one demand miss at a time.
struct Prefetch {
  const float* p;
  int64_t col, len, skip;
};

template <int R, bool PARTIAL, bool PF>
inline void gemm_block_impl(const float* A, int64_t lda, const float* B, int64_t ldb, float* Cm, int64_t ldc,
                            int64_t K, int64_t ncols, Prefetch* pf, bool accumulate) {
  const float* pp = PF ? pf->p : nullptr;
  int64_t pcol = PF ? pf->col : 0;
  Vec acc[R][kGemmNV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kGemmNV; ++v) acc[r][v] = Vec(0.f);
  int64_t cnt[kGemmNV];  // lanes of each column vector (PARTIAL only)
  for (int v = 0; v < kGemmNV; ++v) cnt[v] = std::min<int64_t>(kV, std::max<int64_t>(0, ncols - v * kV));
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    if (PF) {
      for (int v = 0; v < kGemmNV; ++v) _mm_prefetch(reinterpret_cast<const char*>(pp + 16 * v), _MM_HINT_T1);
      pp += 16 * kGemmNV;
      pcol += 16 * kGemmNV;
      if (pcol >= pf->len) {
        pp += pf->skip;
        pcol = 0;
      }
    }
    Vec bv[kGemmNV];
    for (int v = 0; v < kGemmNV; ++v) bv[v] = PARTIAL ? Vec::loadu(b + v * kV, cnt[v]) : Vec::loadu(b + v * kV);
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * lda + k]);
      for (int v = 0; v < kGemmNV; ++v) acc[r][v] = simd::fmadd(a, bv[v], acc[r][v]);
    }
  }
  if (PF) {
    pf->p = pp;
    pf->col = pcol;
  }
  for (int r = 0; r < R; ++r) {
    float* c = Cm + r * ldc;
    for (int v = 0; v < kGemmNV; ++v) {
      if (accumulate) acc[r][v] = acc[r][v] + (PARTIAL ? Vec::loadu(c + v * kV, cnt[v]) : Vec::loadu(c + v * kV));
      if (PARTIAL) acc[r][v].store(c + v * kV, cnt[v]);
      else acc[r][v].store(c + v * kV);
    }
  }
}

template <int R, bool PARTIAL>
inline void gemm_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* Cm, int64_t ldc, int64_t K,
                       int64_t ncols, Prefetch* pf, bool accumulate) {
  if (pf) gemm_block_impl<R, PARTIAL, true>(A, lda, B, ldb, Cm, ldc, K, ncols, pf, accumulate);
  else gemm_block_impl<R, PARTIAL, false>(A, lda, B, ldb, Cm, ldc, K, ncols, nullptr, accumulate);
}

template <bool PARTIAL>
inline void gemm_rows_tail(int rows, const float* A, int64_t lda, const float* B, int64_t ldb, float* Cm, int64_t ldc,
                           int64_t K, int64_t ncols, Prefetch* pf, bool accumulate) {
  switch (rows) {
#define DDPM_FAST_GEMM_CASE(n) \
  case n: if (n < kGemmR) gemm_block<(n < kGemmR ? n : 1), PARTIAL>(A, lda, B, ldb, Cm, ldc, K, ncols, pf, accumulate); break;
    DDPM_FAST_GEMM_CASE(1) DDPM_FAST_GEMM_CASE(2) DDPM_FAST_GEMM_CASE(3) DDPM_FAST_GEMM_CASE(4)
    DDPM_FAST_GEMM_CASE(5) DDPM_FAST_GEMM_CASE(6) DDPM_FAST_GEMM_CASE(7) DDPM_FAST_GEMM_CASE(8)
    DDPM_FAST_GEMM_CASE(9) DDPM_FAST_GEMM_CASE(10) DDPM_FAST_GEMM_CASE(11) DDPM_FAST_GEMM_CASE(12)
    DDPM_FAST_GEMM_CASE(13)
#undef DDPM_FAST_GEMM_CASE
    default: break;
  }
}

// One plane: M (rows x cols, row stride ldc) = V (rows x K, row stride lda) @ U (K x cols, row stride ldb), one
// column panel at a time (the panel, K x 128 bytes, stays in L1 for all row groups); `next` (nullable) is the
// next plane's U, prefetched meanwhile (see Prefetch).
void gemm_plane(const float* A, int64_t lda, const float* B, int64_t ldb, float* Cm, int64_t ldc, int64_t rows,
                int64_t K, int64_t cols, const float* next, bool accumulate = false) {
  constexpr int64_t NC = kGemmNV * kV;
  Prefetch cursor{next, 0, cols, ldb - cols};
  for (int64_t j = 0; j < cols; j += NC) {
    const int64_t nc = std::min<int64_t>(NC, cols - j);
    Prefetch* pf = next ? &cursor : nullptr;  // first row group only
    int64_t r = 0;
    if (nc == NC) {
      for (; r + kGemmR <= rows; r += kGemmR, pf = nullptr)
        gemm_block<kGemmR, false>(A + r * lda, lda, B + j, ldb, Cm + r * ldc + j, ldc, K, nc, pf, accumulate);
      if (r < rows)
        gemm_rows_tail<false>(int(rows - r), A + r * lda, lda, B + j, ldb, Cm + r * ldc + j, ldc, K, nc, pf, accumulate);
    } else {
      for (; r + kGemmR <= rows; r += kGemmR, pf = nullptr)
        gemm_block<kGemmR, true>(A + r * lda, lda, B + j, ldb, Cm + r * ldc + j, ldc, K, nc, pf, accumulate);
      if (r < rows)
        gemm_rows_tail<true>(int(rows - r), A + r * lda, lda, B + j, ldb, Cm + r * ldc + j, ldc, K, nc, pf, accumulate);
    }
  }
}

}  // namespace

void winograd_gemm_kernel(const float* V, int64_t ldv, int64_t C, const float* U, int64_t ldu, int64_t O,
                          float* M, int64_t ldm, int64_t ldr, int64_t rows, int64_t oc, int planes) {
  for (int k = 0; k < planes; ++k)
    gemm_plane(V + k * ldv, C, U + k * ldu, O, M + k * ldm, ldr, rows, C, oc, k + 1 < planes ? U + (k + 1) * ldu : nullptr);
}

void gemm_kernel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                 int64_t K, int64_t cols) {
  // Blocks of kKc along K, each block's sum added to C: one sequential sum of hundreds of products rounds about
  // three times worse than torch's blocked GEMM (tests/test_ops.py's 520-wide heads); the blocks cost nothing
  // measurable.
  constexpr int64_t kKc = 128;
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kKc)
    gemm_plane(A + k0, lda, B + k0 * ldb, ldb, C, ldc, rows, std::min(kKc, K - k0), cols, nullptr, k0 > 0);
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
