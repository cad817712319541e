// Scheduler step: x0 = a_x*x + a_e*eps (clamped), prev = c0*x0 + c1*x + c2*eps + s*noise, one pass, fp32 math.
#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

template <typename T>
static void step_impl(const T* eps, const T* x, const T* noise, T* prev, T* x0, int64_t n, const StepCoefs& c) {
  const Vec ax(c.a_x), ae(c.a_e), c0(c.c0), c1(c.c1), c2(c.c2), ns(c.noise_scale), lo(-c.clip), hi(c.clip);
  for (int64_t i = 0; i < n; i += kV) {
    const int64_t m = std::min<int64_t>(kV, n - i);
    const Vec e = load(eps + i, m), s = load(x + i, m);
    Vec p0 = simd::fmadd(ax, s, ae * e);
    if (c.has_clip) p0 = simd::clamp(p0, lo, hi);
    Vec pv = simd::fmadd(c0, p0, simd::fmadd(c1, s, c2 * e));
    if (c.has_noise) pv = simd::fmadd(ns, load(noise + i, m), pv);
    store(x0 + i, p0, m);
    store(prev + i, pv, m);
  }
}

void scheduler_step_kernel(DType dt, const void* eps, const void* x, const void* noise, void* prev, void* x0,
                           int64_t n, const StepCoefs& c) {
  DDPM_FAST_DISPATCH(dt, step_impl<T>(static_cast<const T*>(eps), static_cast<const T*>(x),
                                      static_cast<const T*>(noise), static_cast<T*>(prev), static_cast<T*>(x0), n,
                                      c);)
}

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
