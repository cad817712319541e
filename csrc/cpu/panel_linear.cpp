// CPU x @ W^T + bias (+ other) for few rows of x against a weight packed as column panels (see
// kernels/panel_gemm_kernel.cpp): each thread takes a contiguous range of panels, so the weight is read once, in
// address order, split between the threads; x's rows (a few KB to a few hundred) stay in cache. fp32 only.
#include <algorithm>
#include <optional>

#include "cpu/common.h"
#include "cpu/pool.h"

namespace ddpm_fast::cpu {

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
  const float* pb = b ? static_cast<const float*>(b->const_data_ptr()) : nullptr;
  const float* pr = r ? static_cast<const float*>(r->const_data_ptr()) : nullptr;
  float* py = static_cast<float*>(y.mutable_data_ptr());
  const int64_t lda = M > 1 ? x.stride(0) : K, ldr = r && M > 1 ? r->stride(0) : N;
  const auto& k = kernels();
  // At least ~64K multiply-adds per chunk of panels, so that small products do not pay for a fork.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * K * 16));
  parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    k.panel_gemm(px, lda, pw, K, py, N, pb, pr, ldr, M, p0, p1);
  });
  return y;
}

}  // namespace ddpm_fast::cpu

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("panel_linear", TORCH_BOX(&ddpm_fast::cpu::panel_linear_cpu));
}
