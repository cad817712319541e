// CPU GroupNorm (+ time-embedding add, + SiLU) in two parallel passes: per-channel statistics over
// cache-sized pieces (shifted two-pass mean / M2, combined per group with Chan's formula in double), then one
// fused multiply-add + SiLU writing the output. NCHW works per channel row, channels_last per chunk of pixels.
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/common.h"

namespace ddpm_fast::cpu {

static at::Tensor float_param(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

static at::Tensor group_norm_silu_cpu(const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, double eps,
                                      const std::optional<at::Tensor>& temb, bool silu) {
  constexpr const char* op = "group_norm_silu";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x_in.dim(), "-D shape ", x_in.sizes());
  check_float_input(op, "x", x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  TORCH_CHECK(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  TORCH_CHECK(C % num_groups == 0, op, ": channels (", C, ") must be divisible by num_groups (", num_groups, ")");
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK(p.device() == x_in.device(), op, ": ", name, " is on ", p.device(), " but x is on ", x_in.device());
    TORCH_CHECK(p.scalar_type() == x_in.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name,
                " must have x's dtype (", x_in.scalar_type(), ") or float32, got ", p.scalar_type());
    TORCH_CHECK(p.dim() == 1 && p.size(0) == C, op, ": ", name, " must have shape (", C, "), got ", p.sizes());
  }
  if (temb.has_value()) {
    check_same(op, "temb", *temb, "x", x_in);
    TORCH_CHECK(temb->dim() == 2 && temb->size(0) == N && temb->size(1) == C, op, ": temb must have shape (", N,
                ", ", C, "), got ", temb->sizes());
  }

  const bool channels_last = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;

  const at::Tensor w = float_param(weight), b = float_param(bias), t = float_param(temb);
  const float* pw = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* pb = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const float* pt = t.defined() ? t.const_data_ptr<float>() : nullptr;
  const DType dt = to_kernel_dtype(x.scalar_type());
  const int64_t es = x.element_size(), G = num_groups, Cg = C / G;
  const char* px = static_cast<const char*>(x.const_data_ptr());
  char* py = static_cast<char*>(y.mutable_data_ptr());
  const auto& k = kernels();

  // Pieces: NCHW = one channel row of HW; channels_last = a chunk of P pixels x C channels (~32 KB) so the
  // second look at it (M2) hits L1/L2, and batch 1 still splits across threads.
  const int64_t P = channels_last ? std::max<int64_t>(1, std::min<int64_t>(HW, 8192 / std::max<int64_t>(C, 1))) : HW;
  const int64_t nchunks = channels_last ? (HW + P - 1) / P : 1;
  std::vector<float> shift(N * nchunks * C), off(N * nchunks * C), m2(N * nchunks * C);
  if (channels_last) {
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t task = b0; task < b1; ++task) {
        const int64_t n = task / nchunks, ch = task % nchunks, p0 = ch * P, p = std::min(P, HW - p0);
        k.col_stats(dt, px + (n * HW + p0) * C * es, p, C, &shift[task * C], &off[task * C], &m2[task * C]);
      }
    });
  } else {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / HW), [&](int64_t r0, int64_t r1) {
      k.row_stats(dt, px, HW, r0, r1, shift.data(), off.data(), m2.data());
    });
  }

  // Combine to per-group statistics in double; temb is a per-channel shift (moves the mean, not M2).
  // Per (n, c): y = ((x - hi) - lo) * a + b with hi + lo = group mean - temb, a = rstd * gamma, b = beta.
  std::vector<float> hi(N * C), lo(N * C), a(N * C), bb(N * C);
  const double count = double(Cg) * double(HW);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      auto piece_mean = [&](int64_t ch, int64_t c) {
        const int64_t i = (n * nchunks + ch) * C + c;
        return double(shift[i]) + double(off[i]) + (pt ? double(pt[n * C + c]) : 0.0);
      };
      auto piece_count = [&](int64_t ch) { return double(std::min(P, HW - ch * P)); };
      double mu = 0.0;
      for (int64_t ch = 0; ch < nchunks; ++ch)
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) mu += piece_count(ch) * piece_mean(ch, c);
      mu /= count;
      double M2 = 0.0;
      for (int64_t ch = 0; ch < nchunks; ++ch)
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const double d = piece_mean(ch, c) - mu;
          M2 += double(m2[(n * nchunks + ch) * C + c]) + piece_count(ch) * d * d;
        }
      const double rstd = 1.0 / std::sqrt(std::max(M2 / count, 0.0) + eps);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double centre = mu - (pt ? double(pt[n * C + c]) : 0.0);
        hi[n * C + c] = float(centre);
        lo[n * C + c] = float(centre - double(hi[n * C + c]));
        a[n * C + c] = float(rstd * (pw ? pw[c] : 1.0));
        bb[n * C + c] = pb ? pb[c] : 0.f;
      }
    }
  }

  if (channels_last) {
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t task = b0; task < b1; ++task) {
        const int64_t n = task / nchunks, ch = task % nchunks, p0 = ch * P, p = std::min(P, HW - p0);
        const int64_t o = (n * HW + p0) * C * es;
        k.col_affine(dt, px + o, py + o, p, C, &hi[n * C], &lo[n * C], &a[n * C], &bb[n * C], silu);
      }
    });
  } else {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / HW), [&](int64_t r0, int64_t r1) {
      k.row_affine(dt, px, py, HW, r0, r1, hi.data(), lo.data(), a.data(), bb.data(), silu);
    });
  }
  return y;
}

}  // namespace ddpm_fast::cpu

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("group_norm_silu", &ddpm_fast::cpu::group_norm_silu_cpu); }
