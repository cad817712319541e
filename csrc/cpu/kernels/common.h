// Shared helpers for the per-ISA kernel objects: fp32 <-> bf16/fp16 conversion and vector load/store
// of any supported dtype as a simd::Vec of floats. Everything lives in namespace CPU_CAPABILITY, so the
// copies compiled for different instruction sets never collide at link time. No torch header is
// included by any kernel object (simd.h is our own vector type).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/kernels.h"
#include "cpu/kernels/simd.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

using simd::Vec;
constexpr int kV = Vec::size();

struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float to_f(float v) { return v; }
inline float to_f(bf16_t v) { return u2f(uint32_t(v.x) << 16); }
inline float to_f(f16_t v) {
  // IEEE half -> float, exact (same construction as the FP16 library).
  const uint32_t w = uint32_t(v.x) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  return u2f(sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized)));
}

template <typename T> inline T from_f(float f);
template <> inline float from_f<float>(float f) { return f; }
template <> inline bf16_t from_f<bf16_t>(float f) {
  if (std::isnan(f)) return {uint16_t(0x7FC0)};
  uint32_t u = f2u(f);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}
template <> inline f16_t from_f<f16_t>(float f) {
  // float -> IEEE half, round to nearest even, overflow to inf, NaN kept.
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f2u(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return {uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// Load n (<= kV) elements as floats; the rest of the vector is zero.
template <typename T> inline Vec load(const T* p, int64_t n = kV) {
  alignas(64) float tmp[kV] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = to_f(p[i]);
  return Vec::loadu(tmp);
}
template <> inline Vec load<float>(const float* p, int64_t n) { return n == kV ? Vec::loadu(p) : Vec::loadu(p, n); }

template <typename T> inline void store(T* p, const Vec& v, int64_t n = kV) {
  alignas(64) float tmp[kV];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = from_f<T>(tmp[i]);
}
template <> inline void store<float>(float* p, const Vec& v, int64_t n) {
  if (n == kV) v.store(p); else v.store(p, static_cast<int>(n));
}

#if defined(CPU_CAPABILITY_AVX512)
// Whole and partial vectors of bf16 / fp16 in registers (the generic versions above go through a float[16]
// one element at a time). The same results as to_f / from_f: bf16 widens exactly and rounds to nearest even
// with NaN -> 0x7FC0; fp16 uses the IEEE conversion instructions (round to nearest even, subnormals and
// infinities exact).
inline __m512 bf16_bits_to_f(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m256i f_to_bf16_bits(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline __m256i load_u16(const void* p, int64_t n) {
  return n >= kV ? _mm256_loadu_si256(static_cast<const __m256i*>(p))
                 : _mm256_maskz_loadu_epi16(Vec::tail_mask(n), p);
}
inline void store_u16(void* p, __m256i v, int64_t n) {
  if (n >= kV) _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  else _mm256_mask_storeu_epi16(p, Vec::tail_mask(n), v);
}
template <> inline Vec load<bf16_t>(const bf16_t* p, int64_t n) { return bf16_bits_to_f(load_u16(p, n)); }
template <> inline Vec load<f16_t>(const f16_t* p, int64_t n) { return _mm512_cvtph_ps(load_u16(p, n)); }
template <> inline void store<bf16_t>(bf16_t* p, const Vec& v, int64_t n) { store_u16(p, f_to_bf16_bits(v), n); }
template <> inline void store<f16_t>(f16_t* p, const Vec& v, int64_t n) {
  store_u16(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), n);
}
#elif defined(CPU_CAPABILITY_AVX2)
// Whole vectors of bf16 / fp16 in registers (F16C is part of this build's flags); partial ones use the
// generic element loop above. Same results as to_f / from_f (see the AVX512 block).
inline __m256 bf16_bits_to_f(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline __m128i f_to_bf16_bits(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
template <> inline Vec load<bf16_t>(const bf16_t* p, int64_t n) {
  if (n < kV) {
    alignas(32) float tmp[kV] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = to_f(p[i]);
    return Vec::loadu(tmp);
  }
  return bf16_bits_to_f(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline Vec load<f16_t>(const f16_t* p, int64_t n) {
  if (n < kV) {
    alignas(32) float tmp[kV] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = to_f(p[i]);
    return Vec::loadu(tmp);
  }
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline void store<bf16_t>(bf16_t* p, const Vec& v, int64_t n) {
  const __m128i h = f_to_bf16_bits(v);
  if (n >= kV) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h); return; }
  alignas(16) uint16_t tmp[kV];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
  std::memcpy(p, tmp, static_cast<size_t>(std::max<int64_t>(n, 0)) * 2);
}
template <> inline void store<f16_t>(f16_t* p, const Vec& v, int64_t n) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (n >= kV) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h); return; }
  alignas(16) uint16_t tmp[kV];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
  std::memcpy(p, tmp, static_cast<size_t>(std::max<int64_t>(n, 0)) * 2);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The AVX2 block's exp2 / exp / SiLU (see there for the method and error bounds) on 16 lanes. rcp14 is exact to
// 2^-14 (AVX2's rcp to 1.5 * 2^-12), so after the one Newton step the SiLU is within ~1e-7 relative.
inline __m512 exp2_clamped(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5345794963650405e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399932067841291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489071726799e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328642129898e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646248340607e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23)));
}

inline Vec exp_nonpos(const Vec& x) {
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __mmask16 nan = _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q);
  t = _mm512_max_ps(t, _mm512_set1_ps(-125.f));
  return Vec(_mm512_mask_blend_ps(nan, exp2_clamped(t), _mm512_castsi512_ps(_mm512_set1_epi32(-1))));
}

inline Vec silu(const Vec& yv) {
  const __m512 y = yv;
  __m512 t = _mm512_mul_ps(y, _mm512_set1_ps(-1.44269504088896341f));
  t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(115.f)), _mm512_set1_ps(-125.f));
  const __m512 d = _mm512_add_ps(exp2_clamped(t), _mm512_set1_ps(1.f));
  const __m512 r = _mm512_rcp14_ps(d);
  const __m512 yr = _mm512_mul_ps(y, r);
  return Vec(_mm512_fmadd_ps(yr, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), yr));
}
inline void silu4(Vec* v) {
  __m512 y[4], t[4], d[4], r[4];
  for (int u = 0; u < 4; ++u) {
    y[u] = v[u];
    t[u] = _mm512_mul_ps(y[u], _mm512_set1_ps(-1.44269504088896341f));
    t[u] = _mm512_max_ps(_mm512_min_ps(t[u], _mm512_set1_ps(115.f)), _mm512_set1_ps(-125.f));
  }
  for (int u = 0; u < 4; ++u) d[u] = _mm512_add_ps(exp2_clamped(t[u]), _mm512_set1_ps(1.f));
  for (int u = 0; u < 4; ++u) r[u] = _mm512_rcp14_ps(d[u]);
  for (int u = 0; u < 4; ++u) {
    const __m512 yr = _mm512_mul_ps(y[u], r[u]);
    v[u] = Vec(_mm512_fmadd_ps(yr, _mm512_fnmadd_ps(d[u], r[u], _mm512_set1_ps(1.f)), yr));
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// 2^t for t in [-125, 115] (callers clamp): 2^n * 2^f with n = round(t), f in [-1/2, 1/2]; a degree-6 fit of
// 2^f (relative error 1e-7 in float), 2^n added straight into the exponent bits (stays a normal float).
inline __m256 exp2_clamped(__m256 t) {
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5345794963650405e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399932067841291e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618489071726799e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328642129898e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022646248340607e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471824645996e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
}

// exp(x) for x <= 0 (softmax after subtracting the row max); below -86 it returns ~2^-125 instead of 0,
// negligible next to the row sum (>= 1). NaN x gives NaN.
inline Vec exp_nonpos(const Vec& x) {
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 nan = _mm256_cmp_ps(t, t, _CMP_UNORD_Q);
  t = _mm256_max_ps(t, _mm256_set1_ps(-125.f));
  return Vec(_mm256_or_ps(exp2_clamped(t), nan));
}

// y * sigmoid(y) = y / (1 + 2^t), t = -y * log2(e), without a libm/Sleef call or a divide (the SiLU pass is
// bound by FMA-port work): exp2_clamped, then a Newton-refined reciprocal (~1.5e-7). t is clamped to
// [-125, 115] so 1 + 2^t stays finite; the clamped ends give y or ~y * 2^-115, within a few ulp of the exact
// SiLU. NaN propagates through the final multiply by y.
inline Vec silu(const Vec& yv) {
  const __m256 y = yv;
  __m256 t = _mm256_mul_ps(y, _mm256_set1_ps(-1.44269504088896341f));
  t = _mm256_max_ps(_mm256_min_ps(t, _mm256_set1_ps(115.f)), _mm256_set1_ps(-125.f));
  const __m256 d = _mm256_add_ps(exp2_clamped(t), _mm256_set1_ps(1.f));
  const __m256 r = _mm256_rcp_ps(d);
  const __m256 yr = _mm256_mul_ps(y, r);
  // y / d = y*r + y*r*(1 - d*r): one Newton step folded into the final multiply.
  return Vec(_mm256_fmadd_ps(yr, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(1.f)), yr));
}
// SiLU of four independent vectors, each step issued for all four before the next: the chain per vector is
// ~20 dependent ops, and interleaving keeps the out-of-order window full (~13% faster than one at a time).
inline void silu4(Vec* v) {
  __m256 y[4], t[4], d[4], r[4];
  for (int u = 0; u < 4; ++u) {
    y[u] = v[u];
    t[u] = _mm256_mul_ps(y[u], _mm256_set1_ps(-1.44269504088896341f));
    t[u] = _mm256_max_ps(_mm256_min_ps(t[u], _mm256_set1_ps(115.f)), _mm256_set1_ps(-125.f));
  }
  for (int u = 0; u < 4; ++u) d[u] = _mm256_add_ps(exp2_clamped(t[u]), _mm256_set1_ps(1.f));
  for (int u = 0; u < 4; ++u) r[u] = _mm256_rcp_ps(d[u]);
  for (int u = 0; u < 4; ++u) {
    const __m256 yr = _mm256_mul_ps(y[u], r[u]);
    v[u] = Vec(_mm256_fmadd_ps(yr, _mm256_fnmadd_ps(d[u], r[u], _mm256_set1_ps(1.f)), yr));
  }
}
#else
inline Vec exp_nonpos(const Vec& x) { return simd::exp(x); }
inline Vec silu(const Vec& y) {
  // y * sigmoid(y); exp(-y) = inf gives y/inf = -0: the correct limit.
  return y / (Vec(1.f) + simd::exp(y.neg()));
}
inline void silu4(Vec* v) {
  for (int u = 0; u < 4; ++u) v[u] = silu(v[u]);
}
#endif

// Calls f.template operator()<T>() for the element type matching dt.
#define DDPM_FAST_DISPATCH(dt, ...)                        \
  switch (dt) {                                            \
    case DType::F32: { using T = float; __VA_ARGS__ } break;  \
    case DType::BF16: { using T = bf16_t; __VA_ARGS__ } break; \
    case DType::F16: { using T = f16_t; __VA_ARGS__ } break;   \
  }

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {
// Defined in the per-family kernel files; collected in table.cpp.
void scheduler_step_kernel(DType, const void* eps, const void* x, const void* noise, void* prev, void* x0,
                           int64_t n, const StepCoefs& c);
void row_stats_kernel(DType, const void* x, int64_t len, int64_t r0, int64_t r1, float* shift, float* off, float* m2);
void col_stats_kernel(DType, const void* x, int64_t p, int64_t c, const float* ref, float* off, float* m2);
void row_affine_kernel(DType, const void* x, void* y, int64_t len, int64_t r0, int64_t r1, const float* hi,
                       const float* a, const float* b, bool silu);
void col_affine_kernel(DType, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t p, int64_t c,
                       const float* hi, const float* a, const float* b, bool silu);
void softmax_rows_kernel(float* s, int64_t rows, int64_t n, int64_t ld, float scale);
void winograd_input_kernel(const float* x, float* V, int64_t H, int64_t W, int64_t C, int64_t tiles_h,
                           int64_t tiles_w, int64_t t0, int64_t t1, int64_t ldv, int tile);
void winograd_output_kernel(const float* M, int64_t ldm, int64_t ldr, float* y, const float* bias,
                            const float* residual, int64_t H, int64_t W, int64_t O, int64_t oc, int64_t tiles_h,
                            int64_t tiles_w, int64_t t0, int64_t t1, bool silu, float inv_scale, int tile);
void panel_gemm_kernel(const float* A, int64_t lda, const float* Wp, int64_t K, float* C, int64_t ldc,
                       const float* bias, const float* R, int64_t ldr, int64_t M, int64_t p0, int64_t p1);
#if defined(CPU_CAPABILITY_AVX512)
void winograd_gemm_kernel(const float* V, int64_t ldv, int64_t C, const float* U, int64_t ldu, int64_t O,
                          float* M, int64_t ldm, int64_t ldr, int64_t rows, int64_t oc, int planes);
void gemm_kernel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                 int64_t K, int64_t cols);
#define DDPM_FAST_WINOGRAD_GEMM winograd_gemm_kernel
#define DDPM_FAST_GEMM gemm_kernel
#else
#define DDPM_FAST_WINOGRAD_GEMM nullptr
#define DDPM_FAST_GEMM nullptr
#endif
}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
