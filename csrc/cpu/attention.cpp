// CPU attention: accepts (B, H, L, D) / (B, L, D) views with any strides (unit last-dim stride is used in
// place; anything else is copied) and runs (batch, head, query block) tasks in parallel: GEMM, fused softmax,
// GEMM.
#include <algorithm>
#include <cmath>
#include <optional>

#include "cpu/common.h"
#include "cpu/pool.h"

namespace ddpm_fast::cpu {

namespace {

// fp32 views with unit stride along the last dim are read in place; other inputs get one fp32 copy.
Tensor prep(const Tensor& t) {
  Tensor f = dtype_of(t) == ScalarType::Float ? t : torch::stable::to(t, ScalarType::Float);
  const int64_t last = f.dim() - 1;
  return (f.stride(last) == 1 || f.size(last) == 1) ? f : torch::stable::contiguous(f);
}

// Sizes and element strides of a 3-D or 4-D operand as (batch, head, row, col); 3-D has one head.
struct Layout4 {
  int64_t size[4], stride[4];
  explicit Layout4(const Tensor& t) {
    const bool three = t.dim() == 3;
    for (int d = 0, s = 0; d < 4; ++d) {
      if (three && d == 1) {
        size[d] = 1;
        stride[d] = 0;
        continue;
      }
      size[d] = t.size(s);
      stride[d] = t.stride(s);
      ++s;
    }
  }
  int64_t offset(int64_t b, int64_t h, int64_t row) const { return b * stride[0] + h * stride[1] + row * stride[2]; }
};

}  // namespace

static Tensor attention_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, std::optional<double> scale) {
  check_attention(q_in, k_in, v_in, DeviceType::CPU);
  const bool three = q_in.dim() == 3;
  const Tensor qf = prep(q_in), kf = prep(k_in), vf = prep(v_in);
  const Layout4 ql(qf), kl(kf), vl(vf);
  const int64_t B = ql.size[0], H = ql.size[1], L = ql.size[2], D = ql.size[3], S = kl.size[2], Dv = vl.size[3];
  const float sc = scale.has_value() ? float(*scale) : float(1.0 / std::sqrt(double(D)));

  const std::vector<int64_t> out_sizes = three ? std::vector<int64_t>{B, L, Dv} : std::vector<int64_t>{B, H, L, Dv};
  Tensor out = pooled(qf, out_sizes, MemoryFormat::Contiguous, ScalarType::Float);
  if (out.numel() > 0) {
    // Per (batch, head, query block): scores = Q_blk K^T and out_blk = softmax(scale * scores) V as two
    // GEMMs around a fused vectorised softmax; the [rows, S] score block stays in L2. At the UNet's S <= 1024
    // the whole key range fits, so no online rescaling is needed. Query blocks are sized so batch 1 still gives
    // every thread a block, and capped so the score block stays cache-sized. The GEMMs are torch's (through
    // aoti_torch_cpu_mm_out, single-threaded inside our parallel region, reading the strided views in place;
    // the shim needs no InferenceMode guard in the worker threads, see stable_compat.h), or the kernel table's
    // where torch's has no AVX-512 kernels here (torch_gemm_avx512()), on a per-thread transposed copy of K.
    const auto& kern = kernels();
    const bool own_gemm = kern.gemm != nullptr && !torch_gemm_avx512();
    const int64_t threads = num_threads();
    const int64_t want_blocks = std::max<int64_t>(1, (threads + B * H - 1) / (B * H));
    int64_t bq = (L + want_blocks - 1) / want_blocks;
    bq = std::max<int64_t>(1, std::min<int64_t>({bq, 256, std::max<int64_t>(8, (512 * 1024) / (4 * S))}));
    const int64_t nqb = (L + bq - 1) / bq;
    parallel_for(0, B * H * nqb, 1, [&](int64_t t0, int64_t t1) {
      Tensor scores = alloc(out, {bq, S});
      std::optional<Tensor> kt_copy;  // own_gemm: K^T of (batch, head) kt_of, (D, S) row-major
      int64_t kt_of = -1;
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t bh = task / nqb, qb = task % nqb, bi = bh / H, hi = bh % H;
        const int64_t q0 = qb * bq, rows = std::min(L, q0 + bq) - q0;
        if (own_gemm) {
          if (!kt_copy) kt_copy = alloc(out, {D, S});
          float* kt = static_cast<float*>(kt_copy->mutable_data_ptr());
          if (kt_of != bh) {
            const float* kp = static_cast<const float*>(kf.const_data_ptr()) + kl.offset(bi, hi, 0);
            for (int64_t j0 = 0; j0 < S; j0 += 16)  // in 16 x 16 blocks: whole cache lines both ways
              for (int64_t d0 = 0; d0 < D; d0 += 16)
                for (int64_t j = j0; j < std::min(S, j0 + 16); ++j)
                  for (int64_t d = d0; d < std::min(D, d0 + 16); ++d) kt[d * S + j] = kp[j * kl.stride[2] + d];
            kt_of = bh;
          }
          float* sp = static_cast<float*>(scores.mutable_data_ptr());
          const float* qp = static_cast<const float*>(qf.const_data_ptr()) + ql.offset(bi, hi, q0);
          const float* vp = static_cast<const float*>(vf.const_data_ptr()) + vl.offset(bi, hi, 0);
          float* op = static_cast<float*>(out.mutable_data_ptr()) + ((bi * H + hi) * L + q0) * Dv;
          kern.gemm(qp, ql.stride[2], kt, S, sp, S, rows, D, S);
          kern.softmax_rows(sp, rows, S, S, sc);
          kern.gemm(sp, S, vp, vl.stride[2], op, Dv, rows, S, Dv);
          continue;
        }
        const Tensor s = strided_view(scores, {rows, S}, {S, 1}, 0);
        const Tensor qv = strided_view(qf, {rows, D}, {ql.stride[2], ql.stride[3]}, ql.offset(bi, hi, q0));
        const Tensor kt = strided_view(kf, {D, S}, {kl.stride[3], kl.stride[2]}, kl.offset(bi, hi, 0));
        mm_out_cpu(s, qv, kt);
        kern.softmax_rows(static_cast<float*>(s.mutable_data_ptr()), rows, S, S, sc);
        const Tensor vv = strided_view(vf, {S, Dv}, {vl.stride[2], vl.stride[3]}, vl.offset(bi, hi, 0));
        const Tensor o = strided_view(out, {rows, Dv}, {Dv, 1}, ((bi * H + hi) * L + q0) * Dv);
        mm_out_cpu(o, s, vv);
      }
    });
  }
  if (dtype_of(q_in) != ScalarType::Float) out = torch::stable::to(out, dtype_of(q_in));
  return out;
}

}  // namespace ddpm_fast::cpu

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("attention", TORCH_BOX(&ddpm_fast::cpu::attention_cpu)); }
