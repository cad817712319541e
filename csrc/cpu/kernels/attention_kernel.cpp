// Blocked attention with an online softmax (flash-attention style), fp32 accumulation.
// Per block of keys: S = Q K^T as register-tiled outer products over a packed K^T block (6 rows x 2 vectors of
// accumulators), the running max / sum update, then O += P V with the same tiling reading V rows in place.
#include <algorithm>
#include <limits>

#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kMR = 6;       // rows per register tile
constexpr int64_t kNW = 2 * kV;  // columns per register tile (two vectors)
static_assert(kAttnKBlock % kNW == 0, "key block must be a multiple of the tile width");

void attn_pack_kt_kernel(const float* k, int64_t k_rs, int64_t S, int64_t D, float* kt) {
  const int64_t nblk = (S + kAttnKBlock - 1) / kAttnKBlock;
  for (int64_t b = 0; b < nblk; ++b) {
    float* blk = kt + b * D * kAttnKBlock;
    for (int64_t jj = 0; jj < kAttnKBlock; ++jj) {
      const int64_t j = b * kAttnKBlock + jj;
      if (j < S) {
        const float* row = k + j * k_rs;
        for (int64_t d = 0; d < D; ++d) blk[d * kAttnKBlock + jj] = row[d];
      } else {
        for (int64_t d = 0; d < D; ++d) blk[d * kAttnKBlock + jj] = 0.f;
      }
    }
  }
}

// s[r][c0 : c0+kNW] = scale * sum_d q[r][d] * kt[d][c0 : c0+kNW] for MR rows. The sum over d runs in
// chunks of kDChunk added together (blocked summation), keeping rounding error low for head dims of 512.
constexpr int64_t kDChunk = 64;
template <int64_t MR>
static inline void qk_tile(const float* q, int64_t q_rs, const float* kt, int64_t D, float scale, float* s,
                           int64_t s_rs) {
  Vec tot[MR][2];
  for (int64_t d0 = 0; d0 < D; d0 += kDChunk) {
    const int64_t d1 = std::min(D, d0 + kDChunk);
    Vec acc[MR][2];
    for (int64_t r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
    for (int64_t d = d0; d < d1; ++d) {
      const Vec b0 = Vec::loadu(kt + d * kAttnKBlock), b1 = Vec::loadu(kt + d * kAttnKBlock + kV);
      for (int64_t r = 0; r < MR; ++r) {
        const Vec a(q[r * q_rs + d]);
        acc[r][0] = at::vec::fmadd(a, b0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(a, b1, acc[r][1]);
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      tot[r][0] = d0 == 0 ? acc[r][0] : tot[r][0] + acc[r][0];
      tot[r][1] = d0 == 0 ? acc[r][1] : tot[r][1] + acc[r][1];
    }
  }
  const Vec vs(scale);
  for (int64_t r = 0; r < MR; ++r) {
    (tot[r][0] * vs).store(s + r * s_rs);
    (tot[r][1] * vs).store(s + r * s_rs + kV);
  }
}

// o[r][dc : dc+w] += sum_j p[r][j] * v[j][dc : dc+w] for MR rows; w <= kNW (partial vectors when w < kNW).
template <int64_t MR>
static inline void pv_tile(const float* p, int64_t p_rs, const float* v, int64_t v_rs, int64_t ncols, float* o,
                           int64_t o_rs, int64_t w) {
  Vec acc[MR][2];
  if (w == kNW) {
    for (int64_t r = 0; r < MR; ++r) {
      acc[r][0] = Vec::loadu(o + r * o_rs);
      acc[r][1] = Vec::loadu(o + r * o_rs + kV);
    }
    for (int64_t j = 0; j < ncols; ++j) {
      const Vec b0 = Vec::loadu(v + j * v_rs), b1 = Vec::loadu(v + j * v_rs + kV);
      for (int64_t r = 0; r < MR; ++r) {
        const Vec a(p[r * p_rs + j]);
        acc[r][0] = at::vec::fmadd(a, b0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(a, b1, acc[r][1]);
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      acc[r][0].store(o + r * o_rs);
      acc[r][1].store(o + r * o_rs + kV);
    }
    return;
  }
  const int64_t w0 = std::min<int64_t>(kV, w), w1 = w - w0;
  for (int64_t r = 0; r < MR; ++r) {
    acc[r][0] = load(o + r * o_rs, w0);
    acc[r][1] = w1 > 0 ? load(o + r * o_rs + kV, w1) : Vec(0.f);
  }
  for (int64_t j = 0; j < ncols; ++j) {
    const Vec b0 = load(v + j * v_rs, w0), b1 = w1 > 0 ? load(v + j * v_rs + kV, w1) : Vec(0.f);
    for (int64_t r = 0; r < MR; ++r) {
      const Vec a(p[r * p_rs + j]);
      acc[r][0] = at::vec::fmadd(a, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(a, b1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < MR; ++r) {
    store(o + r * o_rs, acc[r][0], w0);
    if (w1 > 0) store(o + r * o_rs + kV, acc[r][1], w1);
  }
}

template <typename F>
static inline void by_rows(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) f(r, std::integral_constant<int64_t, kMR>{});
  switch (rows - r) {
    case 5: f(r, std::integral_constant<int64_t, 5>{}); break;
    case 4: f(r, std::integral_constant<int64_t, 4>{}); break;
    case 3: f(r, std::integral_constant<int64_t, 3>{}); break;
    case 2: f(r, std::integral_constant<int64_t, 2>{}); break;
    case 1: f(r, std::integral_constant<int64_t, 1>{}); break;
    default: break;
  }
}

void attn_rows_kernel(const AttnArgs& a, int64_t q0, int64_t q1, float* scratch) {
  const int64_t rows = q1 - q0, Dv = a.Dv, KB = kAttnKBlock;
  float* o = scratch;                 // [rows, Dv]
  float* s = o + rows * Dv;           // [rows, KB]
  float* mx = s + rows * KB;          // running max per row
  float* l = mx + rows;               // running sum per row
  std::fill(o, o + rows * Dv, 0.f);
  std::fill(mx, mx + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.f);
  const float* q = a.q + q0 * a.q_rs;
  const int64_t nblk = (a.S + KB - 1) / KB;
  for (int64_t kb = 0; kb < nblk; ++kb) {
    const int64_t ncols = std::min(KB, a.S - kb * KB);
    const float* kt = a.kt + kb * a.D * KB;
    const int64_t ctiles = (ncols + kNW - 1) / kNW;
    by_rows(rows, [&](int64_t r, auto mr) {
      for (int64_t ct = 0; ct < ctiles; ++ct)
        qk_tile<decltype(mr)::value>(q + r * a.q_rs, a.q_rs, kt + ct * kNW, a.D, a.scale, s + r * KB + ct * kNW, KB);
    });
    // Online softmax update, row by row.
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s + r * KB;
      float m_new = mx[r];
      for (int64_t j = 0; j < ncols; ++j) m_new = std::max(m_new, sr[j]);
      // All -inf scores (only from -inf inputs): keep a finite reference so exp() gives 0, not NaN.
      const float ref = std::isinf(m_new) && m_new < 0 ? 0.f : m_new;
      const float alpha = std::exp(mx[r] - ref);
      const Vec vref(ref);
      Vec sum(0.f);
      int64_t j = 0;
      for (; j + kV <= ncols; j += kV) {
        const Vec e = (Vec::loadu(sr + j) - vref).exp();  // 1-ulp exp: exp_u20 costs accuracy at sharp softmaxes
        e.store(sr + j);
        sum += e;
      }
      float tail = 0.f;
      for (; j < ncols; ++j) { sr[j] = std::exp(sr[j] - ref); tail += sr[j]; }
      l[r] = l[r] * alpha + at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum) + tail;
      if (alpha != 1.f) {
        float* orow = o + r * Dv;
        const Vec va(alpha);
        int64_t d = 0;
        for (; d + kV <= Dv; d += kV) (Vec::loadu(orow + d) * va).store(orow + d);
        for (; d < Dv; ++d) orow[d] *= alpha;
      }
      mx[r] = m_new;
    }
    const float* v = a.v + kb * KB * a.v_rs;
    by_rows(rows, [&](int64_t r, auto mr) {
      for (int64_t dc = 0; dc < Dv; dc += kNW)
        pv_tile<decltype(mr)::value>(s + r * KB, KB, v + dc, a.v_rs, ncols, o + r * Dv + dc, Dv,
                                     std::min<int64_t>(kNW, Dv - dc));
    });
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / l[r];
    const float* orow = o + r * Dv;
    float* dst = a.out + (q0 + r) * a.out_rs;
    const Vec vi(inv);
    int64_t d = 0;
    for (; d + kV <= Dv; d += kV) (Vec::loadu(orow + d) * vi).store(dst + d);
    for (; d < Dv; ++d) dst[d] = orow[d] * inv;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
