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
    const float o = (simd::reduce_add(acc0 + acc1) + tail) / len;
    // Second pass over the (now cached) row: deviations from the mean, no cancellation.
    const Vec vo(o);
    Vec s0(0.f), s1(0.f);
    i = 0;
    for (; i + 2 * kV <= len; i += 2 * kV) {
      const Vec d0 = (load(p + i) - vsh) - vo, d1 = (load(p + i + kV) - vsh) - vo;
      s0 = simd::fmadd(d0, d0, s0);
      s1 = simd::fmadd(d1, d1, s1);
    }
    float tail2 = 0.f;
    for (; i < len; ++i) { const float d = (to_f(p[i]) - sh) - o; tail2 += d * d; }
    shift[r] = sh;
    off[r] = o;
    m2[r] = simd::reduce_add(s0 + s1) + tail2;
  }
}

// Per-column (channel) two-pass statistics around the caller's per-column shift over p pixel rows of c
// channels (a piece of ~32 KB).
// Pass 1 (shifted sums) walks the piece in memory order, since it is the pass that pulls it from DRAM/L3
// (column blocks would stride over rows and defeat the prefetcher); pass 2 (M2) then runs per block of two
// columns-vectors x two rows with its accumulators in registers, reading the now cache-resident piece.
template <typename T>
static inline void col_m2_block(const T* x, int64_t p, int64_t c, int64_t j, const float* shift, const float* off,
                                float* m2) {
  constexpr int NV = 2;
  Vec sh[NV], mu[NV], s[NV], s2[NV];
  for (int k = 0; k < NV; ++k) {
    sh[k] = Vec::loadu(shift + j + k * kV);
    mu[k] = Vec::loadu(off + j + k * kV);
    s[k] = Vec(0.f);
    s2[k] = Vec(0.f);
  }
  int64_t i = 0;
  for (; i + 2 <= p; i += 2) {
    const T* row = x + i * c + j;
    for (int k = 0; k < NV; ++k) {
      const Vec d = (load(row + k * kV) - sh[k]) - mu[k];
      const Vec d2 = (load(row + c + k * kV) - sh[k]) - mu[k];
      s[k] = simd::fmadd(d, d, s[k]);
      s2[k] = simd::fmadd(d2, d2, s2[k]);
    }
  }
  if (i < p)
    for (int k = 0; k < NV; ++k) {
      const Vec d = (load(x + i * c + j + k * kV) - sh[k]) - mu[k];
      s[k] = simd::fmadd(d, d, s[k]);
    }
  for (int k = 0; k < NV; ++k) (s[k] + s2[k]).store(m2 + j + k * kV);
}

template <typename T>
static void col_stats_impl(const T* x, int64_t p, int64_t c, const float* shift, float* off, float* m2) {
  const int64_t cv = c / kV * kV;  // columns covered by full vectors
  for (int64_t j = 0; j < c; ++j) { off[j] = 0.f; m2[j] = 0.f; }
  int64_t i = 0;
  for (; i + 2 <= p; i += 2) {  // two rows per sweep: half the accumulator loads/stores
    const T* row = x + i * c;
    for (int64_t j = 0; j < cv; j += kV) {
      const Vec sh = Vec::loadu(shift + j);
      (Vec::loadu(off + j) + ((load(row + j) - sh) + (load(row + c + j) - sh))).store(off + j);
    }
    for (int64_t j = cv; j < c; ++j) off[j] += (to_f(row[j]) - shift[j]) + (to_f(row[c + j]) - shift[j]);
  }
  for (; i < p; ++i) {
    const T* row = x + i * c;
    for (int64_t j = 0; j < cv; j += kV)
      (Vec::loadu(off + j) + (load(row + j) - Vec::loadu(shift + j))).store(off + j);
    for (int64_t j = cv; j < c; ++j) off[j] += to_f(row[j]) - shift[j];
  }
  const float inv = 1.f / float(p);
  for (int64_t j = 0; j < c; ++j) off[j] *= inv;
  int64_t j = 0;
  for (; j + 2 * kV <= c; j += 2 * kV) col_m2_block(x, p, c, j, shift, off, m2);
  for (; j < c; ++j) {  // odd last vector / ragged columns: scalar, rare in practice
    float s = 0.f;
    for (int64_t i = 0; i < p; ++i) { const float d = (to_f(x[i * c + j]) - shift[j]) - off[j]; s += d * d; }
    m2[j] = s;
  }
}

// y = (x - hi) * a + b: hi is the per-channel centre (group mean - temb) rounded to float, so x - hi is exact
// when the mean is large; the rounding remainder of the centre is folded into b by the caller.
template <typename T>
static void row_affine_impl(const T* x, T* y, int64_t len, int64_t r0, int64_t r1, const float* hi, const float* a,
                            const float* b, bool do_silu) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = x + r * len;
    T* dst = y + r * len;
    const Vec vh(hi[r]), va(a[r]), vb(b[r]);
    int64_t i = 0;
    if (do_silu) {
      for (; i + kV <= len; i += kV) store(dst + i, silu(simd::fmadd(load(src + i) - vh, va, vb)));
    } else {
      for (; i + kV <= len; i += kV) store(dst + i, simd::fmadd(load(src + i) - vh, va, vb));
    }
    if (i < len) {
      const int64_t m = len - i;
      Vec v = simd::fmadd(load(src + i, m) - vh, va, vb);
      store(dst + i, do_silu ? silu(v) : v, m);
    }
  }
}

template <typename T, bool SILU>
static void col_affine_full(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t p, int64_t c, const float* hi,
                            const float* a, const float* b) {
  if (SILU && c % (4 * kV) == 0) {  // the UNet's channel counts: four vectors at a time (see silu4)
    for (int64_t i = 0; i < p; ++i) {
      const T* src = x + i * ldx;
      T* dst = y + i * ldy;
      for (int64_t j = 0; j < c; j += 4 * kV) {
        Vec v[4];
        for (int u = 0; u < 4; ++u) {
          const int64_t jj = j + u * kV;
          v[u] = simd::fmadd(load(src + jj) - Vec::loadu(hi + jj), Vec::loadu(a + jj), Vec::loadu(b + jj));
        }
        silu4(v);
        for (int u = 0; u < 4; ++u) store(dst + j + u * kV, v[u]);
      }
    }
    return;
  }
  for (int64_t i = 0; i < p; ++i) {
    const T* src = x + i * ldx;
    T* dst = y + i * ldy;
    for (int64_t j = 0; j < c; j += kV) {
      Vec v = simd::fmadd(load(src + j) - Vec::loadu(hi + j), Vec::loadu(a + j), Vec::loadu(b + j));
      if (SILU) v = silu(v);
      store(dst + j, v);
    }
  }
}

template <typename T>
static void col_affine_impl(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t p, int64_t c, const float* hi,
                            const float* a, const float* b, bool do_silu) {
  if (c % kV == 0) {
    if (do_silu) col_affine_full<T, true>(x, ldx, y, ldy, p, c, hi, a, b);
    else col_affine_full<T, false>(x, ldx, y, ldy, p, c, hi, a, b);
    return;
  }
  for (int64_t i = 0; i < p; ++i) {
    const T* src = x + i * ldx;
    T* dst = y + i * ldy;
    for (int64_t j = 0; j < c; j += kV) {
      const int64_t m = std::min<int64_t>(kV, c - j);
      Vec v = simd::fmadd(load(src + j, m) - load(hi + j, m), load(a + j, m), load(b + j, m));
      if (do_silu) v = silu(v);
      store(dst + j, v, m);
    }
  }
}

void row_stats_kernel(DType dt, const void* x, int64_t len, int64_t r0, int64_t r1, float* shift, float* off,
                      float* m2) {
  DDPM_FAST_DISPATCH(dt, row_stats_impl<T>(static_cast<const T*>(x), len, r0, r1, shift, off, m2);)
}
void col_stats_kernel(DType dt, const void* x, int64_t p, int64_t c, const float* shift, float* off, float* m2) {
  DDPM_FAST_DISPATCH(dt, col_stats_impl<T>(static_cast<const T*>(x), p, c, shift, off, m2);)
}
void row_affine_kernel(DType dt, const void* x, void* y, int64_t len, int64_t r0, int64_t r1, const float* hi,
                       const float* a, const float* b, bool do_silu) {
  DDPM_FAST_DISPATCH(dt, row_affine_impl<T>(static_cast<const T*>(x), static_cast<T*>(y), len, r0, r1, hi, a, b,
                                            do_silu);)
}
void col_affine_kernel(DType dt, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t p, int64_t c,
                       const float* hi, const float* a, const float* b, bool do_silu) {
  DDPM_FAST_DISPATCH(dt, col_affine_impl<T>(static_cast<const T*>(x), ldx, static_cast<T*>(y), ldy, p, c, hi, a, b,
                                            do_silu);)
}

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
