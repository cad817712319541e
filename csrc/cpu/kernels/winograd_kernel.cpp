// Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 / stride 1 / padding 1 convolutions on channels-last
// activations: the input and output transforms around the per-plane GEMMs (kernels/gemm_kernel.cpp in AVX512
// builds; csrc/cpu/winograd.cpp blocks and schedules the three). Each output tile is m x m pixels (m = 2 or 4), read
// from an (m+2) x (m+2) input patch; every transform is a handful of adds per channel, vectorised across
// channels. Lavin & Gray's matrices (the same as ddpm_fast/ops.py's).
//   input:  V[k][t][c] = (B^T d B)[k] for the patch d of tile t, channel c (zero outside the image)
//   gemm:   M[k][t][o] = sum_c V[k][t][c] * U[k][c][o]   (gemm_kernel.cpp; builds without it use torch's bmm)
//   output: y = A^T m A (+ bias, + residual, then SiLU, then * inv_scale) for m[k] = M[k][t][o]
#include <algorithm>
#include <memory>

#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

namespace {

// F(4x4, 3x3). B^T on one 6-vector a: the rows of B^T =
//   [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
// with fused multiply-adds where the ISA has them (simd::fmadd).
inline void bt6(const Vec* a, Vec* r) {
  const Vec four(4.f), mfour(-4.f), mfive(-5.f), two(2.f);
  const Vec p = simd::fmadd(mfour, a[2], a[4]), q = simd::fmadd(mfour, a[1], a[3]);  // shared by rows 1 and 2
  const Vec u = a[4] - a[2], w = two * (a[3] - a[1]);                                // shared by rows 3 and 4
  r[0] = simd::fmadd(four, a[0], simd::fmadd(mfive, a[2], a[4]));
  r[1] = p + q;
  r[2] = p - q;
  r[3] = u + w;
  r[4] = u - w;
  r[5] = simd::fmadd(four, a[1], simd::fmadd(mfive, a[3], a[5]));
}

// F(2x2, 3x3). B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
inline void bt4(const Vec* a, Vec* r) {
  r[0] = a[0] - a[2];
  r[1] = a[1] + a[2];
  r[2] = a[2] - a[1];
  r[3] = a[1] - a[3];
}

// A^T on one 6-vector: rows [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
inline void at6(const Vec* m, Vec* y) {
  const Vec a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], e = m[3] - m[4];
  y[0] = m[0] + a + c;
  y[1] = simd::fmadd(Vec(2.f), e, b);
  y[2] = simd::fmadd(Vec(4.f), c, a);
  y[3] = simd::fmadd(Vec(8.f), e, b + m[5]);
}

// A^T = [1 1 1 0; 0 1 -1 -1].
inline void at4(const Vec* m, Vec* y) {
  y[0] = m[0] + m[1] + m[2];
  y[1] = m[1] - m[2] - m[3];
}

// One channel vector of one tile: V[k] = (B^T d B)[k] with d(i, j) = ld(i, j) (patch row i, column j) and plane
// k = r * P + c stored by st(k, value). Rows first (each patch row's columns combine, P values live per row),
// then columns, each plane stored as soon as it is final; the P * P intermediates are the only big live set.
template <int TILE, class LD, class ST>
inline void input_tile(const LD& ld, const ST& st) {
  constexpr int P = TILE + 2;
  Vec t[P][P];
#pragma GCC unroll 6
  for (int i = 0; i < P; ++i) {
    Vec a[P];
#pragma GCC unroll 6
    for (int j = 0; j < P; ++j) a[j] = ld(i, j);
    if constexpr (TILE == 2) bt4(a, t[i]);
    else bt6(a, t[i]);
  }
#pragma GCC unroll 6
  for (int c = 0; c < P; ++c) {
    Vec a[P], v[P];
#pragma GCC unroll 6
    for (int i = 0; i < P; ++i) a[i] = t[i][c];
    if constexpr (TILE == 2) bt4(a, v);
    else bt6(a, v);
#pragma GCC unroll 6
    for (int r = 0; r < P; ++r) st(r * P + c, v[r]);
  }
}

// One channel vector of one tile: y(i, j) = (A^T m A)(i, j) for m[k] = ld(k), handed to out(i, row) one output
// row (TILE vectors) at a time.
template <int TILE, class LD, class OUT>
inline void output_tile(const LD& ld, const OUT& out) {
  constexpr int P = TILE + 2;
  Vec s[TILE][P];
#pragma GCC unroll 6
  for (int c = 0; c < P; ++c) {  // A^T m: each column's P planes combine into TILE rows
    Vec a[P], y[TILE];
#pragma GCC unroll 6
    for (int r = 0; r < P; ++r) a[r] = ld(r * P + c);
    if constexpr (TILE == 2) at4(a, y);
    else at6(a, y);
#pragma GCC unroll 4
    for (int i = 0; i < TILE; ++i) s[i][c] = y[i];
  }
#pragma GCC unroll 4
  for (int i = 0; i < TILE; ++i) {  // (A^T m) A: each row's P columns combine into TILE pixels
    Vec y[TILE];
    if constexpr (TILE == 2) at4(s[i], y);
    else at6(s[i], y);
    out(i, y);
  }
}

// The loops below take the tile size as a template argument, so that each copy has fixed trip counts and the
// patch / transformed values can stay in registers. Tiles whose patch lies inside the image (all but the border
// ones) read it straight from x; the border ones go through a table of pixel pointers with zeros outside.
template <int TILE>
void input_tiles(const float* x, float* V, int64_t H, int64_t W, int64_t C, int64_t tiles_h, int64_t tiles_w,
                 int64_t t0, int64_t t1, int64_t ldv, const float* zeros) {
  constexpr int P = TILE + 2;  // patch side
  const int64_t per_image = tiles_h * tiles_w, cv = C / kV * kV, rs = W * C;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / per_image, r = t % per_image;
    const int64_t h0 = TILE * (r / tiles_w) - 1, w0 = TILE * (r % tiles_w) - 1;
    const float* img = x + n * H * W * C;
    float* out = V + (t - t0) * C;
    if (h0 >= 0 && w0 >= 0 && h0 + P <= H && w0 + P <= W) {
      const float* base = img + (h0 * W + w0) * C;
      for (int64_t c = 0; c < cv; c += kV)
        input_tile<TILE>([&](int i, int j) { return Vec::loadu(base + i * rs + j * C + c); },
                         [&](int k, const Vec& v) { v.store(out + k * ldv + c); });
      if (cv < C) {
        const int64_t m = C - cv;
        input_tile<TILE>([&](int i, int j) { return Vec::loadu(base + i * rs + j * C + cv, m); },
                         [&](int k, const Vec& v) { v.store(out + k * ldv + cv, m); });
      }
      continue;
    }
    // Border tile: pixels outside the image read from `zeros` instead (C floats, caller-provided), so the
    // transform runs branch-free on the same code path.
    const float* px[P * P];
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) {
        const int64_t h = h0 + i, w = w0 + j;
        px[i * P + j] = (h >= 0 && h < H && w >= 0 && w < W) ? img + (h * W + w) * C : zeros;
      }
    for (int64_t c = 0; c < cv; c += kV)
      input_tile<TILE>([&](int i, int j) { return Vec::loadu(px[i * P + j] + c); },
                       [&](int k, const Vec& v) { v.store(out + k * ldv + c); });
    if (cv < C) {
      const int64_t m = C - cv;
      input_tile<TILE>([&](int i, int j) { return Vec::loadu(px[i * P + j] + cv, m); },
                       [&](int k, const Vec& v) { v.store(out + k * ldv + cv, m); });
    }
  }
}

// y for channels [o, o + m) of one tile: bias, residual, SiLU, scale on each output row (TILE pixels), stored
// where inside the image.
template <int TILE, bool RES, bool SILU>
struct OutputRow {
  float* y;
  const float* res;
  Vec b, scale;
  int64_t rs, cs, m;
  int rows, cols;  // pixels of this tile inside the image
  void operator()(int i, Vec* v) const {
    if (i >= rows) return;
    for (int j = 0; j < TILE; ++j) {
      v[j] = v[j] + b;
      if (RES) v[j] = v[j] + Vec::loadu(res + i * rs + j * cs, m);
    }
    if (SILU) {
      if constexpr (TILE == 4) {
        silu4(v);
      } else {
        for (int j = 0; j < TILE; ++j) v[j] = silu(v[j]);
      }
    }
    for (int j = 0; j < TILE; ++j)
      if (j < cols) (v[j] * scale).store(y + i * rs + j * cs, m);
  }
};

template <int TILE, bool RES, bool SILU>
void output_tiles(const float* M, int64_t ldm, int64_t ldr, float* y, const float* bias, const float* residual,
                  int64_t H, int64_t W, int64_t O, int64_t oc, int64_t tiles_h, int64_t tiles_w, int64_t t0,
                  int64_t t1, float inv_scale) {
  const int64_t per_image = tiles_h * tiles_w;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / per_image, r = t % per_image, h0 = TILE * (r / tiles_w), w0 = TILE * (r % tiles_w);
    const float* in = M + (t - t0) * ldr;
    const int64_t off = ((n * H + h0) * W + w0) * O;
    OutputRow<TILE, RES, SILU> row{y + off, RES ? residual + off : nullptr, Vec(0.f), Vec(inv_scale), W * O, O, kV,
                                   int(std::min<int64_t>(TILE, H - h0)), int(std::min<int64_t>(TILE, W - w0))};
    for (int64_t o = 0; o < oc; o += kV) {
      const int64_t m = std::min<int64_t>(kV, oc - o);
      row.y = y + off + o;
      row.res = RES ? residual + off + o : nullptr;
      row.m = m;
      row.b = bias ? Vec::loadu(bias + o, m) : Vec(0.f);
      if (m == kV) output_tile<TILE>([&](int k) { return Vec::loadu(in + k * ldm + o); }, row);
      else output_tile<TILE>([&](int k) { return Vec::loadu(in + k * ldm + o, m); }, row);
    }
  }
}

template <int TILE>
void output_tiles_any(const float* M, int64_t ldm, int64_t ldr, float* y, const float* bias, const float* residual,
                      int64_t H, int64_t W, int64_t O, int64_t oc, int64_t tiles_h, int64_t tiles_w, int64_t t0,
                      int64_t t1, bool do_silu, float inv_scale) {
#define DDPM_FAST_OUT(RES, SILU) \
  output_tiles<TILE, RES, SILU>(M, ldm, ldr, y, bias, residual, H, W, O, oc, tiles_h, tiles_w, t0, t1, inv_scale)
  if (residual) {
    if (do_silu) DDPM_FAST_OUT(true, true);
    else DDPM_FAST_OUT(true, false);
  } else {
    if (do_silu) DDPM_FAST_OUT(false, true);
    else DDPM_FAST_OUT(false, false);
  }
#undef DDPM_FAST_OUT
}


}  // namespace

void winograd_input_kernel(const float* x, float* V, int64_t H, int64_t W, int64_t C, int64_t tiles_h,
                           int64_t tiles_w, int64_t t0, int64_t t1, int64_t ldv, int tile) {
  // C zeros for the pixels outside the image (border tiles), on the stack up to 1024 channels.
  constexpr int64_t kStackZeros = 1024;
  alignas(64) float stack_zeros[kStackZeros];
  std::unique_ptr<float[]> heap_zeros;
  const float* zeros = stack_zeros;
  if (C <= kStackZeros) {
    std::fill(stack_zeros, stack_zeros + ((C + kV - 1) / kV) * kV, 0.f);
  } else {
    heap_zeros.reset(new float[C]());
    zeros = heap_zeros.get();
  }
  if (tile == 2) input_tiles<2>(x, V, H, W, C, tiles_h, tiles_w, t0, t1, ldv, zeros);
  else input_tiles<4>(x, V, H, W, C, tiles_h, tiles_w, t0, t1, ldv, zeros);
}

void winograd_output_kernel(const float* M, int64_t ldm, int64_t ldr, float* y, const float* bias,
                            const float* residual, int64_t H, int64_t W, int64_t O, int64_t oc, int64_t tiles_h,
                            int64_t tiles_w, int64_t t0, int64_t t1, bool do_silu, float inv_scale, int tile) {
  if (tile == 2)
    output_tiles_any<2>(M, ldm, ldr, y, bias, residual, H, W, O, oc, tiles_h, tiles_w, t0, t1, do_silu, inv_scale);
  else
    output_tiles_any<4>(M, ldm, ldr, y, bias, residual, H, W, O, oc, tiles_h, tiles_w, t0, t1, do_silu, inv_scale);
}


}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
