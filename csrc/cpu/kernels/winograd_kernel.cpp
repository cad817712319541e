// Winograd F(2x2, 3x3) and F(4x4, 3x3) transforms for 3x3 / stride 1 / padding 1 convolutions on channels-last
// activations (csrc/cpu/winograd.cpp runs the 16 or 36 GEMMs between them). Each output tile is m x m pixels
// (m = 2 or 4), read from an (m+2) x (m+2) input patch; every transform is a handful of adds per channel,
// vectorised across channels. Lavin & Gray's matrices (the same as ddpm_fast/ops.py's).
//   input:  V[k][t][c] = (B^T d B)[k] for the patch d of tile t, channel c (zero outside the image)
//   output: y = A^T m A (+ bias, + residual, then SiLU, then * inv_scale) for m[k] = M[k][t][o]
#include <algorithm>

#include "cpu/kernels/common.h"

namespace ddpm_fast::cpu {
namespace CPU_CAPABILITY {

namespace {

// B^T x B for one vector lane group: d[16] in row-major 4x4, result in v[16].
inline void input_tile(const Vec* d, Vec* v) {
  Vec t[16];
  for (int j = 0; j < 4; ++j) {  // B^T d: rows combine
    t[0 * 4 + j] = d[0 * 4 + j] - d[2 * 4 + j];
    t[1 * 4 + j] = d[1 * 4 + j] + d[2 * 4 + j];
    t[2 * 4 + j] = d[2 * 4 + j] - d[1 * 4 + j];
    t[3 * 4 + j] = d[1 * 4 + j] - d[3 * 4 + j];
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns combine
    v[i * 4 + 0] = t[i * 4 + 0] - t[i * 4 + 2];
    v[i * 4 + 1] = t[i * 4 + 1] + t[i * 4 + 2];
    v[i * 4 + 2] = t[i * 4 + 2] - t[i * 4 + 1];
    v[i * 4 + 3] = t[i * 4 + 1] - t[i * 4 + 3];
  }
}

// A^T m A: m[16] row-major 4x4 -> y[4] row-major 2x2.
inline void output_tile(const Vec* m, Vec* y) {
  Vec s[8];
  for (int j = 0; j < 4; ++j) {
    s[0 * 4 + j] = m[0 * 4 + j] + m[1 * 4 + j] + m[2 * 4 + j];
    s[1 * 4 + j] = m[1 * 4 + j] - m[2 * 4 + j] - m[3 * 4 + j];
  }
  for (int i = 0; i < 2; ++i) {
    y[i * 2 + 0] = s[i * 4 + 0] + s[i * 4 + 1] + s[i * 4 + 2];
    y[i * 2 + 1] = s[i * 4 + 1] - s[i * 4 + 2] - s[i * 4 + 3];
  }
}

// F(4x4, 3x3). B^T on one 6-vector a (stride s): the rows of B^T =
//   [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
inline void bt6(const Vec* a, int s, Vec* r, int rs) {
  const Vec four(4.f), five(5.f), two(2.f);
  const Vec a0 = a[0], a1 = a[s], a2 = a[2 * s], a3 = a[3 * s], a4 = a[4 * s], a5 = a[5 * s];
  const Vec p = a4 - four * a2, q = a3 - four * a1;  // shared by rows 1 and 2
  const Vec u = a4 - a2, w = two * (a3 - a1);        // shared by rows 3 and 4
  r[0] = four * a0 - five * a2 + a4;
  r[rs] = p + q;
  r[2 * rs] = p - q;
  r[3 * rs] = u + w;
  r[4 * rs] = u - w;
  r[5 * rs] = four * a1 - five * a3 + a5;
}

inline void input_tile6(const Vec* d, Vec* v) {
  Vec t[36];
  for (int j = 0; j < 6; ++j) bt6(d + j, 6, t + j, 6);      // B^T d: rows combine
  for (int i = 0; i < 6; ++i) bt6(t + 6 * i, 1, v + 6 * i, 1);  // (B^T d) B: columns combine
}

// A^T on one 6-vector: rows [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
inline void at6(const Vec* m, int s, Vec* y, int ys) {
  const Vec a = m[s] + m[2 * s], b = m[s] - m[2 * s], c = m[3 * s] + m[4 * s], e = m[3 * s] - m[4 * s];
  y[0] = m[0] + a + c;
  y[ys] = b + Vec(2.f) * e;
  y[2 * ys] = a + Vec(4.f) * c;
  y[3 * ys] = b + Vec(8.f) * e + m[5 * s];
}

inline void output_tile6(const Vec* m, Vec* y) {
  Vec s[24];
  for (int j = 0; j < 6; ++j) at6(m + j, 6, s + j, 6);      // A^T m: 4 rows of 6
  for (int i = 0; i < 4; ++i) at6(s + 6 * i, 1, y + 4 * i, 1);  // (A^T m) A: 4 x 4
}

// The loops below take the tile size as a template argument, so that each copy has fixed trip counts and the
// patch / transformed values can stay in registers.
template <int TILE>
void input_tiles(const float* x, float* V, int64_t H, int64_t W, int64_t C, int64_t tiles_h, int64_t tiles_w,
                 int64_t t0, int64_t t1, int64_t ldv) {
  constexpr int P = TILE + 2, KK = P * P;  // patch side, transformed values per tile
  const int64_t per_image = tiles_h * tiles_w;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / per_image, r = t % per_image;
    const int64_t h0 = TILE * (r / tiles_w) - 1, w0 = TILE * (r % tiles_w) - 1;
    const float* img = x + n * H * W * C;
    const float* px[KK];  // pixel pointers of the patch, nullptr outside the image
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) {
        const int64_t h = h0 + i, w = w0 + j;
        px[i * P + j] = (h >= 0 && h < H && w >= 0 && w < W) ? img + (h * W + w) * C : nullptr;
      }
    float* out = V + (t - t0) * C;
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t m = std::min<int64_t>(kV, C - c);
      Vec d[KK], v[KK];
      for (int k = 0; k < KK; ++k) {
        const float* q = px[k];
        d[k] = q ? (m == kV ? Vec::loadu(q + c) : Vec::loadu(q + c, m)) : Vec(0.f);
      }
      if constexpr (TILE == 2) input_tile(d, v);
      else input_tile6(d, v);
      for (int k = 0; k < KK; ++k) {
        if (m == kV) v[k].store(out + k * ldv + c);
        else v[k].store(out + k * ldv + c, static_cast<int>(m));
      }
    }
  }
}

template <int TILE>
void output_tiles(const float* M, float* y, const float* bias, const float* residual, int64_t H, int64_t W,
                  int64_t O, int64_t tiles_h, int64_t tiles_w, int64_t t0, int64_t t1, int64_t ldm, bool do_silu,
                  float inv_scale) {
  constexpr int KK = (TILE + 2) * (TILE + 2), NPIX = TILE * TILE;
  const int64_t per_image = tiles_h * tiles_w;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / per_image, r = t % per_image, h0 = TILE * (r / tiles_w), w0 = TILE * (r % tiles_w);
    const float* in = M + (t - t0) * O;
    int64_t offs[NPIX];
    bool inside[NPIX];
    for (int i = 0; i < TILE; ++i)
      for (int j = 0; j < TILE; ++j) {
        inside[i * TILE + j] = h0 + i < H && w0 + j < W;
        offs[i * TILE + j] = ((n * H + h0 + i) * W + w0 + j) * O;
      }
    for (int64_t o = 0; o < O; o += kV) {
      const int64_t m = std::min<int64_t>(kV, O - o);
      auto ld = [&](const float* p) { return m == kV ? Vec::loadu(p) : Vec::loadu(p, m); };
      Vec mv[KK], out[NPIX];
      for (int k = 0; k < KK; ++k) mv[k] = ld(in + k * ldm + o);
      if constexpr (TILE == 2) output_tile(mv, out);
      else output_tile6(mv, out);
      const Vec b = bias ? ld(bias + o) : Vec(0.f);
      for (int q = 0; q < NPIX; ++q) {
        if (!inside[q]) continue;
        Vec v = out[q] + b;
        if (residual) v = v + ld(residual + offs[q] + o);
        if (do_silu) v = silu(v);
        if (inv_scale != 1.f) v = v * Vec(inv_scale);
        if (m == kV) v.store(y + offs[q] + o);
        else v.store(y + offs[q] + o, static_cast<int>(m));
      }
    }
  }
}

}  // namespace

void winograd_input_kernel(const float* x, float* V, int64_t H, int64_t W, int64_t C, int64_t tiles_h,
                           int64_t tiles_w, int64_t t0, int64_t t1, int64_t ldv, int tile) {
  if (tile == 2) input_tiles<2>(x, V, H, W, C, tiles_h, tiles_w, t0, t1, ldv);
  else input_tiles<4>(x, V, H, W, C, tiles_h, tiles_w, t0, t1, ldv);
}

void winograd_output_kernel(const float* M, float* y, const float* bias, const float* residual, int64_t H,
                            int64_t W, int64_t O, int64_t tiles_h, int64_t tiles_w, int64_t t0, int64_t t1,
                            int64_t ldm, bool do_silu, float inv_scale, int tile) {
  if (tile == 2) output_tiles<2>(M, y, bias, residual, H, W, O, tiles_h, tiles_w, t0, t1, ldm, do_silu, inv_scale);
  else output_tiles<4>(M, y, bias, residual, H, W, O, tiles_h, tiles_w, t0, t1, ldm, do_silu, inv_scale);
}

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
