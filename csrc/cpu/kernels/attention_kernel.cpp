// Row softmax for the CPU attention (csrc/cpu/attention.cpp runs the two GEMMs around it): row max, one fused
// exp-and-sum pass with the fast exp of common.h, one scaling pass; the row is L1/L2-resident throughout.
#include <algorithm>
#include <limits>

#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

void softmax_rows_kernel(float* s, int64_t rows, int64_t n, int64_t ld, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    int64_t j = 0;
    // Row max of scale * s: the max of s, or its min when scale < 0.
    Vec m(-std::numeric_limits<float>::infinity()), mn(std::numeric_limits<float>::infinity());
    for (; j + kV <= n; j += kV) {
      const Vec v = Vec::loadu(row + j);
      m = simd::maximum(m, v);
      mn = simd::minimum(mn, v);
    }
    float hi = simd::reduce_max(m);
    float lo = -simd::reduce_max(mn.neg());
    for (; j < n; ++j) { hi = std::max(hi, row[j]); lo = std::min(lo, row[j]); }
    float ref = (scale >= 0.f ? hi : lo) * scale;
    // All scores -inf (only from -inf inputs): keep a finite reference so exp() gives 0, not NaN.
    if (std::isinf(ref)) ref = 0.f;
    const Vec vs(scale), vref(ref);
    Vec sum(0.f);
    for (j = 0; j + kV <= n; j += kV) {
      const Vec e = exp_nonpos(simd::fmsub(Vec::loadu(row + j), vs, vref));
      e.store(row + j);
      sum += e;
    }
    float tot = simd::reduce_add(sum);
    for (; j < n; ++j) { row[j] = std::exp(std::fma(row[j], scale, -ref)); tot += row[j]; }
    const Vec inv(1.f / tot);
    for (j = 0; j + kV <= n; j += kV) (Vec::loadu(row + j) * inv).store(row + j);
    for (; j < n; ++j) row[j] *= 1.f / tot;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
