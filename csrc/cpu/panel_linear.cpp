// CPU GEMMs of few rows against a weight packed as column panels (see kernels/panel_gemm_kernel.cpp): each thread
// takes a contiguous range of panels, so the weight is read once, in address order, split between the threads;
// the rows (a few KB to a few hundred) stay in cache. fp32 only.
//   panel_linear:   x @ W^T + bias (+ other) for x's rows.
//   conv3x3_panels: a 3x3 / stride 1 / padding 1 convolution of few pixels (the 4x4 level at batch 1) as that
//     GEMM over its im2col rows, built here into pooled scratch: one op instead of a padded copy, the strided
//     gather of its neighbourhoods and the views around them.
#include <algorithm>
#include <cstring>
#include <optional>

#include "cpu/common.h"
#include "cpu/pool.h"

namespace ddpm_fast::cpu {

namespace {

// C (M x 16 P, row stride ldc) = A (M x K, row stride lda) @ the P panels + bias (+ R), the panels split across the
// threads.
void run_panels(const float* A, int64_t lda, const float* panels, int64_t K, float* C, int64_t ldc, const float* bias,
                const float* R, int64_t ldr, int64_t M, int64_t P) {
  const auto& k = kernels();
  // At least ~64K multiply-adds per chunk of panels, so that small products do not pay for a fork.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * K * 16));
  parallel_for(0, P, grain,
               [&](int64_t p0, int64_t p1) { k.panel_gemm(A, lda, panels, K, C, ldc, bias, R, ldr, M, p0, p1); });
}

const float* float_data(const std::optional<Tensor>& t) {
  return t ? static_cast<const float*>(t->const_data_ptr()) : nullptr;
}

}  // namespace

static Tensor panel_linear_cpu(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& other) {
  check_panel_linear(x_in, weight, bias, other, DeviceType::CPU);
  // Rows may be any view with unit column stride (im2col rows, channels_last pixels); anything else is copied.
  auto rows = [](const Tensor& t) { return t.stride(1) == 1 || t.size(1) <= 1 ? t : torch::stable::contiguous(t); };
  const Tensor x = rows(x_in);
  const int64_t M = x.size(0), K = x.size(1), P = weight.size(0), N = 16 * P;
  Tensor y = pooled(x, {M, N});
  if (M == 0 || N == 0) return y;
  const Tensor w = weight.is_contiguous() ? weight : torch::stable::contiguous(weight);
  const std::optional<Tensor> b = bias ? std::optional<Tensor>(bias->is_contiguous() ? *bias : torch::stable::contiguous(*bias))
                                       : std::nullopt;
  const std::optional<Tensor> r = other ? std::optional<Tensor>(rows(*other)) : std::nullopt;
  const float* px = static_cast<const float*>(x.const_data_ptr());
  const float* pw = static_cast<const float*>(w.const_data_ptr());
  float* py = static_cast<float*>(y.mutable_data_ptr());
  const int64_t lda = M > 1 ? x.stride(0) : K, ldr = r && M > 1 ? r->stride(0) : N;
  run_panels(px, lda, pw, K, py, N, float_data(b), float_data(r), ldr, M, P);
  return y;
}

static Tensor conv3x3_panels_cpu(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bias,
                                 const std::optional<Tensor>& residual) {
  check_conv3x3_panels(x_in, weight, bias, residual, DeviceType::CPU);
  auto channels_last = [](const Tensor& t) {
    return is_channels_last_contiguous(t) ? t : torch::stable::contiguous(t, MemoryFormat::ChannelsLast);
  };
  auto contiguous = [](const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); };
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), P = weight.size(0);
  const int64_t O = 16 * P, M = N * H * W, K = 9 * C;
  const Tensor x = channels_last(x_in);
  Tensor y = pooled(x, {N, O, H, W}, MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const Tensor w = contiguous(weight);
  const std::optional<Tensor> b = bias ? std::optional<Tensor>(contiguous(*bias)) : std::nullopt;
  const std::optional<Tensor> r = residual ? std::optional<Tensor>(channels_last(*residual)) : std::nullopt;
  // The im2col rows, pixel by pixel of the channels_last input: row (n, h, w) holds the 3x3 neighbourhood's
  // pixels in (kh, kw) order, C floats each, zeros outside the image.
  const PoolScratch scratch(4 * std::max<int64_t>(1, M * K));
  float* rows = scratch.floats();
  const float* px = static_cast<const float*>(x.const_data_ptr());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t wi = 0; wi < W; ++wi) {
        float* row = rows + ((n * H + h) * W + wi) * K;
        for (int64_t kh = 0; kh < 3; ++kh)
          for (int64_t kw = 0; kw < 3; ++kw) {
            const int64_t hh = h + kh - 1, ww = wi + kw - 1;
            float* dst = row + (kh * 3 + kw) * C;
            if (hh >= 0 && hh < H && ww >= 0 && ww < W) std::memcpy(dst, px + ((n * H + hh) * W + ww) * C, 4 * C);
            else std::memset(dst, 0, 4 * C);
          }
      }
  run_panels(rows, K, static_cast<const float*>(w.const_data_ptr()), K, static_cast<float*>(y.mutable_data_ptr()), O,
             float_data(b), float_data(r), O, M, P);
  return y;
}

}  // namespace ddpm_fast::cpu

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("panel_linear", TORCH_BOX(&ddpm_fast::cpu::panel_linear_cpu));
  m.impl("conv3x3_panels", TORCH_BOX(&ddpm_fast::cpu::conv3x3_panels_cpu));
}
