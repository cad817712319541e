// CPU attention glue: accepts (B, H, L, D) / (B, L, D) views with any strides (unit last-dim stride is used
// in place; anything else is copied), packs K^T per (batch, head), then runs the blocked online-softmax kernel
// over (batch, head, query block) tasks in parallel.
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/common.h"

namespace ddpm_fast::cpu {

static at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                std::optional<double> scale) {
  constexpr const char* op = "attention";
  TORCH_CHECK(q_in.dim() == 4 || q_in.dim() == 3, op, ": q must be 4-D (B, H, L, D) or 3-D (B, L, D), got ",
              q_in.dim(), "-D shape ", q_in.sizes());
  check_float_input(op, "q", q_in);
  check_same(op, "k", k_in, "q", q_in);
  check_same(op, "v", v_in, "q", q_in);
  TORCH_CHECK(k_in.dim() == q_in.dim() && v_in.dim() == q_in.dim(), op, ": q, k and v must have the same ndim, got ",
              q_in.dim(), ", ", k_in.dim(), " and ", v_in.dim());
  const bool three = q_in.dim() == 3;
  const at::Tensor q = three ? q_in.unsqueeze(1) : q_in, k = three ? k_in.unsqueeze(1) : k_in,
                   v = three ? v_in.unsqueeze(1) : v_in;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && v.size(0) == B && v.size(1) == H, op,
              ": batch/head sizes differ: q ", q_in.sizes(), ", k ", k_in.sizes(), ", v ", v_in.sizes());
  TORCH_CHECK(k.size(3) == D, op, ": k's last dim (", k.size(3), ") must equal q's (", D, ")");
  TORCH_CHECK(v.size(2) == S, op, ": v has ", v.size(2), " keys but k has ", S);
  TORCH_CHECK(S > 0 || L == 0, op, ": k and v need at least one key");
  TORCH_CHECK(D > 0, op, ": head dim must be positive");
  const float sc = scale.has_value() ? float(*scale) : float(1.0 / std::sqrt(double(D)));

  // fp32 views with unit stride along the last dim are read in place; other inputs get one fp32 copy.
  auto prep = [](const at::Tensor& t) {
    at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
    return (f.stride(3) == 1 || f.size(3) == 1) ? f : f.contiguous();
  };
  const at::Tensor qf = prep(q), kf = prep(k), vf = prep(v);
  at::Tensor out = at::empty({B, H, L, Dv}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    const auto& kern = kernels();
    const int64_t KB = kAttnKBlock, nkb = (S + KB - 1) / KB, kt_size = nkb * D * KB;
    std::vector<float> kt(B * H * kt_size);
    const float* pk = kf.const_data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bh = b0; bh < b1; ++bh) {
        const int64_t bi = bh / H, hi = bh % H;
        kern.attn_pack_kt(pk + bi * kf.stride(0) + hi * kf.stride(1), kf.stride(2), S, D, &kt[bh * kt_size]);
      }
    });
    // Query block: enough tasks for every thread (batch 1, one head), multiple of the 6-row tile, <= 72 rows.
    const int64_t threads = at::get_num_threads();
    const int64_t want_blocks = std::max<int64_t>(1, (4 * threads + B * H - 1) / (B * H));
    int64_t bq = (L + want_blocks - 1) / want_blocks;
    bq = std::min<int64_t>(72, std::max<int64_t>(6, (bq + 5) / 6 * 6));
    const int64_t nqb = (L + bq - 1) / bq;
    const float* pq = qf.const_data_ptr<float>();
    const float* pv = vf.const_data_ptr<float>();
    float* po = out.mutable_data_ptr<float>();
    at::parallel_for(0, B * H * nqb, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scratch(attn_scratch_floats(bq, Dv));
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t bh = task / nqb, qb = task % nqb, bi = bh / H, hi = bh % H;
        AttnArgs args{pq + bi * qf.stride(0) + hi * qf.stride(1),
                      &kt[bh * kt_size],
                      pv + bi * vf.stride(0) + hi * vf.stride(1),
                      po + bh * L * Dv,
                      qf.stride(2), vf.stride(2), Dv, L, S, D, Dv, sc};
        kern.attn_rows(args, qb * bq, std::min(L, (qb + 1) * bq), scratch.data());
      }
    });
  }
  if (q.scalar_type() != at::kFloat) out = out.to(q.scalar_type());
  return three ? out.squeeze(1) : out;
}

}  // namespace ddpm_fast::cpu

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("attention", &ddpm_fast::cpu::attention_cpu); }
