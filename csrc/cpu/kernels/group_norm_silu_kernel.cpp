// GroupNorm(+SiLU) building blocks: stable per-channel statistics (two passes over a cache-resident row or
// pixel chunk, combined per group by the caller with Chan's formula) and the fused affine + SiLU pass.

#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

// Statistics are taken around a shift (the piece's first value) so that |mean| >> std loses nothing: the
// piece mean is returned as shift + off (off small), M2 as the sum of squared deviations from it.
template <typename T>
static void row_stats_impl(const T* x, int64_t len, int64_t r0, int64_t r1, float* shift, float* off, float* m2) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* p = x + r * len;
    const float sh = to_f(p[0]);
    const Vec vsh(sh);
    Vec acc0(0.f), acc1(0.f);
    int64_t i = 0;
    for (; i + 2 * kV <= len; i += 2 * kV) { acc0 += load(p + i) - vsh; acc1 += load(p + i + kV) - vsh; }
    float tail = 0.f;
    for (; i < len; ++i) tail += to_f(p[i]) - sh;
    const float o = (at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1) + tail) / len;
    // Second pass over the (now cached) row: deviations from the mean, no cancellation.
    const Vec vo(o);
    Vec s0(0.f), s1(0.f);
    i = 0;
    for (; i + 2 * kV <= len; i += 2 * kV) {
      const Vec d0 = (load(p + i) - vsh) - vo, d1 = (load(p + i + kV) - vsh) - vo;
      s0 = at::vec::fmadd(d0, d0, s0);
      s1 = at::vec::fmadd(d1, d1, s1);
    }
    float tail2 = 0.f;
    for (; i < len; ++i) { const float d = (to_f(p[i]) - sh) - o; tail2 += d * d; }
    shift[r] = sh;
    off[r] = o;
    m2[r] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s0 + s1) + tail2;
  }
}

template <typename T>
static void col_stats_impl(const T* x, int64_t p, int64_t c, float* shift, float* off, float* m2) {
  for (int64_t j = 0; j < c; ++j) { shift[j] = to_f(x[j]); off[j] = 0.f; m2[j] = 0.f; }
  for (int64_t i = 0; i < p; ++i) {
    const T* row = x + i * c;
    for (int64_t j = 0; j < c; j += kV) {
      const int64_t m = std::min<int64_t>(kV, c - j);
      store(off + j, load(off + j, m) + (load(row + j, m) - load(shift + j, m)), m);
    }
  }
  const float inv = 1.f / float(p);
  for (int64_t j = 0; j < c; ++j) off[j] *= inv;
  for (int64_t i = 0; i < p; ++i) {
    const T* row = x + i * c;
    for (int64_t j = 0; j < c; j += kV) {
      const int64_t m = std::min<int64_t>(kV, c - j);
      const Vec d = (load(row + j, m) - load(shift + j, m)) - load(off + j, m);
      store(m2 + j, at::vec::fmadd(d, d, load(m2 + j, m)), m);
    }
  }
}

// y = ((x - hi) - lo) * a + b: hi + lo is the per-channel centre (group mean - temb) in two floats, so
// x - hi is exact when the mean is large and the output keeps full precision.
template <typename T>
static void row_affine_impl(const T* x, T* y, int64_t len, int64_t r0, int64_t r1, const float* hi, const float* lo,
                            const float* a, const float* b, bool do_silu) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = x + r * len;
    T* dst = y + r * len;
    const Vec vh(hi[r]), vl(lo[r]), va(a[r]), vb(b[r]);
    for (int64_t i = 0; i < len; i += kV) {
      const int64_t m = std::min<int64_t>(kV, len - i);
      Vec v = at::vec::fmadd((load(src + i, m) - vh) - vl, va, vb);
      if (do_silu) v = silu(v);
      store(dst + i, v, m);
    }
  }
}

template <typename T>
static void col_affine_impl(const T* x, T* y, int64_t p, int64_t c, const float* hi, const float* lo, const float* a,
                            const float* b, bool do_silu) {
  for (int64_t i = 0; i < p; ++i) {
    const T* src = x + i * c;
    T* dst = y + i * c;
    for (int64_t j = 0; j < c; j += kV) {
      const int64_t m = std::min<int64_t>(kV, c - j);
      Vec v = at::vec::fmadd((load(src + j, m) - load(hi + j, m)) - load(lo + j, m), load(a + j, m), load(b + j, m));
      if (do_silu) v = silu(v);
      store(dst + j, v, m);
    }
  }
}

void row_stats_kernel(DType dt, const void* x, int64_t len, int64_t r0, int64_t r1, float* shift, float* off,
                      float* m2) {
  DDPM_FAST_DISPATCH(dt, row_stats_impl<T>(static_cast<const T*>(x), len, r0, r1, shift, off, m2);)
}
void col_stats_kernel(DType dt, const void* x, int64_t p, int64_t c, float* shift, float* off, float* m2) {
  DDPM_FAST_DISPATCH(dt, col_stats_impl<T>(static_cast<const T*>(x), p, c, shift, off, m2);)
}
void row_affine_kernel(DType dt, const void* x, void* y, int64_t len, int64_t r0, int64_t r1, const float* hi,
                       const float* lo, const float* a, const float* b, bool do_silu) {
  DDPM_FAST_DISPATCH(dt, row_affine_impl<T>(static_cast<const T*>(x), static_cast<T*>(y), len, r0, r1, hi, lo, a, b,
                                            do_silu);)
}
void col_affine_kernel(DType dt, const void* x, void* y, int64_t p, int64_t c, const float* hi, const float* lo,
                       const float* a, const float* b, bool do_silu) {
  DDPM_FAST_DISPATCH(dt, col_affine_impl<T>(static_cast<const T*>(x), static_cast<T*>(y), p, c, hi, lo, a, b,
                                            do_silu);)
}

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
