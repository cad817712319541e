// GroupNorm(+SiLU) building blocks: stable per-channel statistics (two passes over a cache-resident row or
// pixel chunk, combined per group by the caller with Chan's formula) and the fused affine + SiLU pass.

#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

template <typename T>
static void row_stats_impl(const T* x, int64_t len, int64_t r0, int64_t r1, float* mean, float* m2) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* p = x + r * len;
    Vec acc0(0.f), acc1(0.f);
    int64_t i = 0;
    for (; i + 2 * kV <= len; i += 2 * kV) { acc0 += load(p + i); acc1 += load(p + i + kV); }
    for (; i < len; i += kV) acc0 += load(p + i, std::min<int64_t>(kV, len - i));
    const float mu = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1) / len;
    // Second pass over the (now cached) row: deviations from the mean, no cancellation.
    const Vec vmu(mu);
    Vec s0(0.f), s1(0.f);
    i = 0;
    for (; i + 2 * kV <= len; i += 2 * kV) {
      const Vec d0 = load(p + i) - vmu, d1 = load(p + i + kV) - vmu;
      s0 = at::vec::fmadd(d0, d0, s0);
      s1 = at::vec::fmadd(d1, d1, s1);
    }
    for (; i < len; i += kV) {
      const int64_t m = std::min<int64_t>(kV, len - i);
      // Lanes past the end load as 0: mask them out of the squared deviations.
      alignas(64) float d[kV] = {};
      (load(p + i, m) - vmu).store(d);
      for (int64_t j = m; j < kV; ++j) d[j] = 0.f;
      const Vec dv = Vec::loadu(d);
      s0 = at::vec::fmadd(dv, dv, s0);
    }
    mean[r] = mu;
    m2[r] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s0 + s1);
  }
}

template <typename T>
static void col_stats_impl(const T* x, int64_t p, int64_t c, float* mean, float* m2) {
  for (int64_t j = 0; j < c; ++j) { mean[j] = 0.f; m2[j] = 0.f; }
  for (int64_t i = 0; i < p; ++i) {
    const T* row = x + i * c;
    for (int64_t j = 0; j < c; j += kV) {
      const int64_t m = std::min<int64_t>(kV, c - j);
      store(mean + j, load(mean + j, m) + load(row + j, m), m);
    }
  }
  const float inv = 1.f / float(p);
  for (int64_t j = 0; j < c; ++j) mean[j] *= inv;
  for (int64_t i = 0; i < p; ++i) {
    const T* row = x + i * c;
    for (int64_t j = 0; j < c; j += kV) {
      const int64_t m = std::min<int64_t>(kV, c - j);
      const Vec d = load(row + j, m) - load(mean + j, m);
      store(m2 + j, at::vec::fmadd(d, d, load(m2 + j, m)), m);
    }
  }
}

template <typename T>
static void row_affine_impl(const T* x, T* y, int64_t len, int64_t r0, int64_t r1, const float* a, const float* b,
                            bool do_silu) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = x + r * len;
    T* dst = y + r * len;
    const Vec va(a[r]), vb(b[r]);
    for (int64_t i = 0; i < len; i += kV) {
      const int64_t m = std::min<int64_t>(kV, len - i);
      Vec v = at::vec::fmadd(load(src + i, m), va, vb);
      if (do_silu) v = silu(v);
      store(dst + i, v, m);
    }
  }
}

template <typename T>
static void col_affine_impl(const T* x, T* y, int64_t p, int64_t c, const float* a, const float* b, bool do_silu) {
  for (int64_t i = 0; i < p; ++i) {
    const T* src = x + i * c;
    T* dst = y + i * c;
    int64_t j = 0;
    for (; j + kV <= c; j += kV) {
      Vec v = at::vec::fmadd(load(src + j), Vec::loadu(a + j), Vec::loadu(b + j));
      if (do_silu) v = silu(v);
      store(dst + j, v);
    }
    if (j < c) {
      const int64_t m = c - j;
      Vec v = at::vec::fmadd(load(src + j, m), Vec::loadu(a + j, m), Vec::loadu(b + j, m));
      if (do_silu) v = silu(v);
      store(dst + j, v, m);
    }
  }
}

void row_stats_kernel(DType dt, const void* x, int64_t len, int64_t r0, int64_t r1, float* mean, float* m2) {
  DDPM_FAST_DISPATCH(dt, row_stats_impl<T>(static_cast<const T*>(x), len, r0, r1, mean, m2);)
}
void col_stats_kernel(DType dt, const void* x, int64_t p, int64_t c, float* mean, float* m2) {
  DDPM_FAST_DISPATCH(dt, col_stats_impl<T>(static_cast<const T*>(x), p, c, mean, m2);)
}
void row_affine_kernel(DType dt, const void* x, void* y, int64_t len, int64_t r0, int64_t r1, const float* a,
                       const float* b, bool do_silu) {
  DDPM_FAST_DISPATCH(dt, row_affine_impl<T>(static_cast<const T*>(x), static_cast<T*>(y), len, r0, r1, a, b,
                                            do_silu);)
}
void col_affine_kernel(DType dt, const void* x, void* y, int64_t p, int64_t c, const float* a, const float* b,
                       bool do_silu) {
  DDPM_FAST_DISPATCH(dt, col_affine_impl<T>(static_cast<const T*>(x), static_cast<T*>(y), p, c, a, b, do_silu);)
}

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
