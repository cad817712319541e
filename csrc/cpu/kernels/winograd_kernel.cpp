// Winograd F(2x2, 3x3) transforms for 3x3 / stride 1 / padding 1 convolutions on channels-last activations
// (csrc/cpu/winograd.cpp runs the 16 GEMMs between them). Each output tile is 2x2 pixels, read from a 4x4
// input patch; every transform is a handful of adds per channel, vectorised across channels.
//   input:  V[k][t][c] = (B^T d B)[k] for the 4x4 patch d of tile t, channel c (zero outside the image)
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

}  // namespace

void winograd_input_kernel(const float* x, float* V, int64_t H, int64_t W, int64_t C, int64_t tiles_h,
                           int64_t tiles_w, int64_t t0, int64_t t1, int64_t ldv) {
  const int64_t per_image = tiles_h * tiles_w;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / per_image, r = t % per_image, h0 = 2 * (r / tiles_w) - 1, w0 = 2 * (r % tiles_w) - 1;
    const float* img = x + n * H * W * C;
    const float* rows[4][4];  // pixel pointers of the patch, nullptr outside the image
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t h = h0 + i, w = w0 + j;
        rows[i][j] = (h >= 0 && h < H && w >= 0 && w < W) ? img + (h * W + w) * C : nullptr;
      }
    float* out = V + (t - t0) * C;
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t m = std::min<int64_t>(kV, C - c);
      Vec d[16], v[16];
      for (int k = 0; k < 16; ++k) {
        const float* p = rows[k / 4][k % 4];
        d[k] = p ? (m == kV ? Vec::loadu(p + c) : Vec::loadu(p + c, m)) : Vec(0.f);
      }
      input_tile(d, v);
      for (int k = 0; k < 16; ++k) {
        if (m == kV) v[k].store(out + k * ldv + c);
        else v[k].store(out + k * ldv + c, static_cast<int>(m));
      }
    }
  }
}

void winograd_output_kernel(const float* M, float* y, const float* bias, const float* residual, int64_t H,
                            int64_t W, int64_t O, int64_t tiles_h, int64_t tiles_w, int64_t t0, int64_t t1,
                            int64_t ldm, bool do_silu, float inv_scale) {
  const int64_t per_image = tiles_h * tiles_w;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / per_image, r = t % per_image, h0 = 2 * (r / tiles_w), w0 = 2 * (r % tiles_w);
    const float* in = M + (t - t0) * O;
    int64_t offs[4];
    bool inside[4];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        inside[i * 2 + j] = h0 + i < H && w0 + j < W;
        offs[i * 2 + j] = ((n * H + h0 + i) * W + w0 + j) * O;
      }
    for (int64_t o = 0; o < O; o += kV) {
      const int64_t m = std::min<int64_t>(kV, O - o);
      auto ld = [&](const float* p) { return m == kV ? Vec::loadu(p) : Vec::loadu(p, m); };
      Vec mv[16], out[4];
      for (int k = 0; k < 16; ++k) mv[k] = ld(in + k * ldm + o);
      output_tile(mv, out);
      const Vec b = bias ? ld(bias + o) : Vec(0.f);
      for (int q = 0; q < 4; ++q) {
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

}  // namespace CPU_CAPABILITY
}  // namespace ddpm_fast::cpu
