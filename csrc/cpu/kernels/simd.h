// The float vector the per-ISA CPU kernels (csrc/cpu/kernels/*.cpp) are written in, one build per instruction
// set (CMakeLists.txt compiles every kernel file once per entry of its ISA list, defining CPU_CAPABILITY=<ISA>
// and CPU_CAPABILITY_<ISA>):
//   DEFAULT  portable C++ over `float[8]`, compiled with the compiler's baseline flags (SSE2 on x86-64, NEON
//            on arm64); the loops are written so that they auto-vectorise.
//   AVX2     one __m256 per vector (8 lanes), AVX2 + FMA intrinsics.
//   AVX512   one __m512 per vector (16 lanes), AVX-512 F/BW/DQ/VL intrinsics; partial loads and stores are
//            masked (__mmask16), so they never touch memory past `count` either.
// It replaces ATen's at::vec::Vectorized<float>, which refuses to compile under TORCH_TARGET_VERSION (the
// stable ABI), with the few operations the kernels use, each with the semantics the kernels were tuned
// with: NaN-propagating maximum / minimum, clamp written as min(max(x, lo), hi), a fused multiply-add only
// where the ISA has one (DEFAULT computes a * b + c with two roundings), masked partial loads / stores that
// never touch memory past `count`, and horizontal reductions in a fixed order (DEFAULT folds lanes 1..7 into
// lane 0 left to right; AVX2 halves 128-bit, 64-bit, then 32-bit; AVX512 halves 256-bit first, then the same).
// Kernels only use Vec::size() (8, 8, 16), so their loops follow the lane count.
//
// Adding an ISA: add it to the ISA list in CMakeLists.txt with its flags, a `#elif defined(CPU_CAPABILITY_X)`
// block below defining the same class and free functions, its exp2 / silu / dtype conversions in
// kernels/common.h (or let it use the portable ones there), and a branch in csrc/cpu/dispatch.cpp.
//
// Everything here is inside namespace CPU_CAPABILITY so the copies built for different ISAs never merge
// at link time (an inline function compiled with AVX2 flags must not be picked for the DEFAULT build).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#ifndef CPU_CAPABILITY
#error "simd.h is for the per-ISA kernel objects: CMakeLists.txt defines CPU_CAPABILITY for them"
#endif

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {
namespace simd {

#if defined(CPU_CAPABILITY_AVX2)

class Vec {
 public:
  static constexpr int size() { return 8; }

  Vec() = default;  // uninitialised, like a bare __m256
  Vec(float x) : v_(_mm256_set1_ps(x)) {}  // NOLINT: broadcast, implicit on purpose (Vec(0.f), x * 2.f)
  Vec(__m256 x) : v_(x) {}                 // NOLINT: to and from intrinsics
  operator __m256() const { return v_; }

  static Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  // Lanes [0, count) from p, the rest zero; reads nothing past p + count.
  static Vec loadu(const float* p, int64_t count) {
    if (count >= size()) return loadu(p);
    return _mm256_maskload_ps(p, tail_mask(count));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v_); }
  // Writes lanes [0, count) only.
  void store(float* p, int64_t count) const {
    if (count >= size()) store(p);
    else if (count > 0) _mm256_maskstore_ps(p, tail_mask(count), v_);
  }

  Vec neg() const { return _mm256_xor_ps(_mm256_set1_ps(-0.f), v_); }
  Vec& operator+=(const Vec& o) { v_ = _mm256_add_ps(v_, o.v_); return *this; }

 private:
  static __m256i tail_mask(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  __m256 v_;
};

inline Vec operator+(const Vec& a, const Vec& b) { return _mm256_add_ps(a, b); }
inline Vec operator-(const Vec& a, const Vec& b) { return _mm256_sub_ps(a, b); }
inline Vec operator*(const Vec& a, const Vec& b) { return _mm256_mul_ps(a, b); }
inline Vec operator/(const Vec& a, const Vec& b) { return _mm256_div_ps(a, b); }

inline Vec fmadd(const Vec& a, const Vec& b, const Vec& c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
inline Vec fmsub(const Vec& a, const Vec& b, const Vec& c) { return _mm256_fmsub_ps(a, b, c); }  // a * b - c

// IEEE maximum / minimum: NaN in either lane gives NaN (vmaxps alone would drop a NaN in `a`).
inline Vec maximum(const Vec& a, const Vec& b) {
  return _mm256_or_ps(_mm256_max_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
}
inline Vec minimum(const Vec& a, const Vec& b) {
  return _mm256_or_ps(_mm256_min_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
}
// min(max(x, lo), hi); NaN x stays NaN.
inline Vec clamp(const Vec& x, const Vec& lo, const Vec& hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, x)); }

// Horizontal reductions: halves, then quarters, then pairs.
template <typename Op>
inline float reduce(const Vec& x, Op op) {
  Vec v = x;
  v = op(v, Vec(_mm256_permute2f128_ps(v, v, 0x1)));
  v = op(v, Vec(_mm256_shuffle_ps(v, v, 0x4E)));
  v = op(v, Vec(_mm256_shuffle_ps(v, v, 0xB1)));
  return _mm256_cvtss_f32(v);
}

#elif defined(CPU_CAPABILITY_AVX512)

class Vec {
 public:
  static constexpr int size() { return 16; }

  Vec() = default;  // uninitialised, like a bare __m512
  Vec(float x) : v_(_mm512_set1_ps(x)) {}  // NOLINT: broadcast, implicit on purpose (Vec(0.f), x * 2.f)
  Vec(__m512 x) : v_(x) {}                 // NOLINT: to and from intrinsics
  operator __m512() const { return v_; }

  static Vec loadu(const float* p) { return _mm512_loadu_ps(p); }
  // Lanes [0, count) from p, the rest zero; reads nothing past p + count (masked lanes do not fault).
  static Vec loadu(const float* p, int64_t count) {
    if (count >= size()) return loadu(p);
    return _mm512_maskz_loadu_ps(tail_mask(count), p);
  }
  void store(float* p) const { _mm512_storeu_ps(p, v_); }
  // Writes lanes [0, count) only.
  void store(float* p, int64_t count) const {
    if (count >= size()) store(p);
    else _mm512_mask_storeu_ps(p, tail_mask(count), v_);
  }

  Vec neg() const { return _mm512_xor_ps(_mm512_set1_ps(-0.f), v_); }
  Vec& operator+=(const Vec& o) { v_ = _mm512_add_ps(v_, o.v_); return *this; }

  // Lanes [0, count) set, for count < 16 (count <= 0: none).
  static __mmask16 tail_mask(int64_t count) {
    return count <= 0 ? __mmask16(0) : __mmask16((1u << static_cast<unsigned>(count)) - 1u);
  }

 private:
  __m512 v_;
};

inline Vec operator+(const Vec& a, const Vec& b) { return _mm512_add_ps(a, b); }
inline Vec operator-(const Vec& a, const Vec& b) { return _mm512_sub_ps(a, b); }
inline Vec operator*(const Vec& a, const Vec& b) { return _mm512_mul_ps(a, b); }
inline Vec operator/(const Vec& a, const Vec& b) { return _mm512_div_ps(a, b); }

inline Vec fmadd(const Vec& a, const Vec& b, const Vec& c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline Vec fmsub(const Vec& a, const Vec& b, const Vec& c) { return _mm512_fmsub_ps(a, b, c); }  // a * b - c

// IEEE maximum / minimum: NaN in either lane gives NaN (all-ones bits, as the AVX2 build's OR gives).
inline Vec maximum(const Vec& a, const Vec& b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q), _mm512_max_ps(a, b),
                              _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
}
inline Vec minimum(const Vec& a, const Vec& b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q), _mm512_min_ps(a, b),
                              _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
}
// min(max(x, lo), hi); NaN x stays NaN.
inline Vec clamp(const Vec& x, const Vec& lo, const Vec& hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, x)); }

// Horizontal reductions: 256-bit halves, then 128-bit, 64-bit and 32-bit, all on full vectors.
template <typename Op>
inline float reduce(const Vec& x, Op op) {
  Vec v = x;
  v = op(v, Vec(_mm512_shuffle_f32x4(v, v, 0x4E)));
  v = op(v, Vec(_mm512_shuffle_f32x4(v, v, 0xB1)));
  v = op(v, Vec(_mm512_permute_ps(v, 0x4E)));
  v = op(v, Vec(_mm512_permute_ps(v, 0xB1)));
  return _mm512_cvtss_f32(v);
}

#else  // DEFAULT

class Vec {
 public:
  static constexpr int size() { return 8; }

  Vec() : v_{} {}  // zero
  Vec(float x) {   // NOLINT: broadcast
    for (int i = 0; i < size(); ++i) v_[i] = x;
  }

  static Vec loadu(const float* p) {
    Vec r;
    std::memcpy(r.v_, p, sizeof(r.v_));
    return r;
  }
  static Vec loadu(const float* p, int64_t count) {
    Vec r;
    std::memcpy(r.v_, p, static_cast<size_t>(std::min<int64_t>(std::max<int64_t>(count, 0), size())) * sizeof(float));
    return r;
  }
  void store(float* p) const { std::memcpy(p, v_, sizeof(v_)); }
  void store(float* p, int64_t count) const {
    std::memcpy(p, v_, static_cast<size_t>(std::min<int64_t>(std::max<int64_t>(count, 0), size())) * sizeof(float));
  }

  float operator[](int i) const { return v_[i]; }
  float& operator[](int i) { return v_[i]; }

  Vec neg() const { return map([](float x) { return -x; }); }
  Vec& operator+=(const Vec& o) {
    for (int i = 0; i < size(); ++i) v_[i] += o.v_[i];
    return *this;
  }

  template <typename F>
  Vec map(F f) const {
    Vec r;
    for (int i = 0; i < size(); ++i) r.v_[i] = f(v_[i]);
    return r;
  }
  template <typename F>
  static Vec zip(const Vec& a, const Vec& b, F f) {
    Vec r;
    for (int i = 0; i < size(); ++i) r.v_[i] = f(a.v_[i], b.v_[i]);
    return r;
  }

 private:
  alignas(32) float v_[8];
};

inline Vec operator+(const Vec& a, const Vec& b) { return Vec::zip(a, b, [](float x, float y) { return x + y; }); }
inline Vec operator-(const Vec& a, const Vec& b) { return Vec::zip(a, b, [](float x, float y) { return x - y; }); }
inline Vec operator*(const Vec& a, const Vec& b) { return Vec::zip(a, b, [](float x, float y) { return x * y; }); }
inline Vec operator/(const Vec& a, const Vec& b) { return Vec::zip(a, b, [](float x, float y) { return x / y; }); }

// No FMA in the baseline ISA: two roundings, as the compiler would emit for `a * b + c` there.
inline Vec fmadd(const Vec& a, const Vec& b, const Vec& c) { return a * b + c; }
inline Vec fmsub(const Vec& a, const Vec& b, const Vec& c) { return a * b - c; }

inline Vec maximum(const Vec& a, const Vec& b) {
  return Vec::zip(a, b, [](float x, float y) { return std::isnan(x) ? x : (x > y ? x : y); });
}
inline Vec minimum(const Vec& a, const Vec& b) {
  return Vec::zip(a, b, [](float x, float y) { return std::isnan(x) ? x : (x < y ? x : y); });
}
inline Vec clamp(const Vec& x, const Vec& lo, const Vec& hi) {
  Vec r;
  for (int i = 0; i < Vec::size(); ++i) r[i] = std::min(std::max(x[i], lo[i]), hi[i]);
  return r;
}

// exp per lane (libm); the AVX2 / AVX512 builds have their own exp2-based helpers in kernels/common.h instead.
inline Vec exp(const Vec& x) { return x.map([](float v) { return std::exp(v); }); }

// Lanes folded into lane 0 left to right: op(...op(op(x0, x1), x2)..., x7).
template <typename Op>
inline float reduce(const Vec& x, Op op) {
  Vec acc = x;
  for (int i = 1; i < Vec::size(); ++i) {
    Vec next;  // zero
    next[0] = x[i];
    acc = op(acc, next);
  }
  return acc[0];
}

#endif

inline float reduce_add(const Vec& x) { return reduce(x, [](const Vec& a, const Vec& b) { return a + b; }); }
inline float reduce_max(const Vec& x) { return reduce(x, [](const Vec& a, const Vec& b) { return maximum(a, b); }); }

}  // namespace simd
}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
