// CPU GroupNorm (+ time-embedding add, + SiLU) in two passes: per-channel statistics over
// cache-sized pieces (shifted two-pass mean / M2, combined per group with Chan's formula in double), then one
// fused multiply-add + SiLU writing the output. NCHW works per channel row, channels_last per chunk of pixels.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "cpu/common.h"

namespace ddpm_fast::cpu {

static std::optional<Tensor> float_param(const std::optional<Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  // Already fp32 and dense (the usual case): skip the to / contiguous dispatcher round trips (~1 us each).
  if (t->scalar_type() == ScalarType::Float && t->is_contiguous()) return *t;
  return torch::stable::contiguous(torch::stable::to(*t, ScalarType::Float));
}

// Element i of a bf16 / fp16 / fp32 buffer as float (exact).
static float element_as_float(DType dt, const void* p, int64_t i) {
  if (dt == DType::F32) return static_cast<const float*>(p)[i];
  uint16_t h;
  std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
  uint32_t u;
  if (dt == DType::BF16) {
    u = uint32_t(h) << 16;
  } else {  // IEEE half
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0x1F) {
      u = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
      u = sign | ((exp + 112u) << 23) | (man << 13);
    } else {
      float f = std::ldexp(float(man), -24);  // zero or subnormal
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static Tensor group_norm_silu_cpu(const Tensor& x_in, int64_t num_groups, const std::optional<Tensor>& weight,
                                  const std::optional<Tensor>& bias, double eps, const std::optional<Tensor>& temb,
                                  bool silu) {
  DDPM_FAST_CHECK(x_in.dim() == 4, "group_norm_silu: x must be 4-D (N, C, H, W), got ", x_in.dim(), "-D shape ",
                  sizes_str(x_in.sizes()));
  check_group_norm_silu(x_in, num_groups, weight, bias, eps, temb, DeviceType::CPU);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);

  const bool channels_last = !x_in.is_contiguous() && is_channels_last_contiguous(x_in);
  const Tensor x = channels_last || x_in.is_contiguous() ? x_in : torch::stable::contiguous(x_in);
  Tensor y = alloc_like(x, channels_last ? MemoryFormat::ChannelsLast : MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;

  const std::optional<Tensor> w = float_param(weight), b = float_param(bias), t = float_param(temb);
  const float* pw = w ? static_cast<const float*>(w->const_data_ptr()) : nullptr;
  const float* pb = b ? static_cast<const float*>(b->const_data_ptr()) : nullptr;
  const float* pt = t ? static_cast<const float*>(t->const_data_ptr()) : nullptr;
  const DType dt = kernel_dtype(x.scalar_type(), "group_norm_silu", "x");
  const int64_t es = static_cast<int64_t>(x.element_size()), G = num_groups, Cg = C / G;
  const char* px = static_cast<const char*>(x.const_data_ptr());
  char* py = static_cast<char*>(y.mutable_data_ptr());
  const auto& k = kernels();

  // Pieces: NCHW = one channel row of HW; channels_last = a chunk of P pixels x C channels (~32 KB) so the
  // second look at it (M2) hits L1/L2, and batch 1 still splits across threads.
  const int64_t P = channels_last ? std::max<int64_t>(1, std::min<int64_t>(HW, 8192 / std::max<int64_t>(C, 1))) : HW;
  const int64_t nchunks = channels_last ? (HW + P - 1) / P : 1;
  // Statistics per piece and channel: mean = ref + off, M2 around it. ref is one value per (sample, channel)
  // shared by all its pieces (channels_last: the sample's first pixel; NCHW: the row's first value), so the
  // pieces' offsets are small numbers that combine in float; only the per-channel totals go to double.
  std::vector<float> shift(N * C), off(N * nchunks * C), m2(N * nchunks * C);
  if (channels_last) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) shift[n * C + c] = element_as_float(dt, px, n * HW * C + c);
  }

  // Per-sample coefficients (Chan's combination; temb is a per-channel shift that moves the mean, not M2):
  // y = (x - hi) * a + b2 with hi = float(group mean - temb), a = rstd * gamma and b2 = beta - (centre - hi) * a,
  // the rounding remainder of the centre folded into b2.
  const double count = double(Cg) * double(HW);
  auto coefs = [&](int64_t n, float* hi, float* a, float* b2, float* work) {
    float* so = work;       // per channel: sum over pieces of count * off, then the channel's mean offset
    float* sm2 = work + C;  // per channel: M2 around the channel mean
    std::fill(work, work + 2 * C, 0.f);
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const float w = float(std::min(P, HW - ch * P));
      const float* o = &off[(n * nchunks + ch) * C];
      for (int64_t c = 0; c < C; ++c) so[c] += w * o[c];
    }
    const float inv_hw = 1.f / float(HW);
    for (int64_t c = 0; c < C; ++c) so[c] *= inv_hw;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const float w = float(std::min(P, HW - ch * P));
      const float* o = &off[(n * nchunks + ch) * C];
      const float* q = &m2[(n * nchunks + ch) * C];
      for (int64_t c = 0; c < C; ++c) {
        const float d = o[c] - so[c];
        sm2[c] += q[c] + w * d * d;
      }
    }
    const float* ref = &shift[n * C];
    const float* tn = pt ? pt + n * C : nullptr;
    for (int64_t g = 0; g < G; ++g) {
      double mu = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        mu += double(ref[c]) + double(so[c]) + (tn ? double(tn[c]) : 0.0);
      mu /= double(Cg);
      double M2 = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double d = double(ref[c]) + double(so[c]) + (tn ? double(tn[c]) : 0.0) - mu;
        M2 += double(sm2[c]) + double(HW) * d * d;
      }
      const double rstd = 1.0 / std::sqrt(std::max(M2 / count, 0.0) + eps);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double centre = mu - (tn ? double(tn[c]) : 0.0);
        const double ad = rstd * (pw ? pw[c] : 1.0);
        hi[c] = float(centre);
        a[c] = float(ad);
        b2[c] = float((pb ? double(pb[c]) : 0.0) - (centre - double(hi[c])) * ad);
      }
    }
  };

  if (channels_last) {
    // One parallel region for both passes: participant i owns pieces [i*np/nt, (i+1)*np/nt). A sample whose
    // pieces one call of `run` owns entirely is done start to finish while its slab is still in L2
    // (statistics, coefficients, apply). A sample split across calls (batch 1) needs every piece's
    // statistics before any of it is applied; rather than a second fork/join (these ops take ~10-100 us, a
    // region costs several us) the calls share that sample's pieces through a claim flag per piece: a call
    // takes the statistics of its own pieces first, then, before applying its part, of every piece of the
    // sample nobody has claimed yet, and waits only for pieces another call has claimed and is computing.
    // A claimed piece is finished by a thread that is running and waits for nothing meanwhile, so the wait
    // is short and always ends, however torch_parallel_for runs the calls: all at once, one after another
    // (the first call then takes every piece itself) or as one nested call covering every participant.
    const int64_t np = N * nchunks;
    const int64_t work = N * C * HW;
    int64_t nt = std::min<int64_t>(num_threads(), np);
    if (work < 16384) nt = 1;
    enum : uint8_t { kFree = 0, kClaimed = 1, kDone = 2 };
    std::unique_ptr<std::atomic<uint8_t>[]> state(new std::atomic<uint8_t>[np]);
    for (int64_t i = 0; i < np; ++i) state[i].store(kFree, std::memory_order_relaxed);
    auto stats = [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t n = task / nchunks, ch = task % nchunks, p0 = ch * P, p = std::min(P, HW - p0);
        k.col_stats(dt, px + (n * HW + p0) * C * es, p, C, &shift[n * C], &off[task * C], &m2[task * C]);
      }
    };
    // Statistics of each piece in [t0, t1) that nobody has claimed (split samples only).
    auto claim_stats = [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        uint8_t expected = kFree;
        if (!state[task].compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel)) continue;
        stats(task, task + 1);
        state[task].store(kDone, std::memory_order_release);
      }
    };
    auto wait_done = [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task)
        for (int spins = 0; state[task].load(std::memory_order_acquire) != kDone; ++spins) {
          if (spins < 4000) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
          } else {
            std::this_thread::yield();
          }
        }
    };
    auto apply = [&](int64_t n, int64_t t0, int64_t t1, std::vector<float>& cf) {
      coefs(n, cf.data(), cf.data() + C, cf.data() + 2 * C, cf.data() + 3 * C);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t ch = task % nchunks, p0 = ch * P, p = std::min(P, HW - p0);
        const int64_t o = (n * HW + p0) * C * es;
        k.col_affine(dt, px + o, py + o, p, C, cf.data(), cf.data() + C, cf.data() + 2 * C, silu);
      }
    };
    auto run = [&](int64_t i0, int64_t i1) {
      const int64_t pc0 = i0 * np / nt, pc1 = i1 * np / nt;
      std::vector<float> cf(5 * C);
      // Segments of [pc0, pc1) by sample; split ones are those not covering their whole sample.
      auto for_segments = [&](auto&& f) {
        for (int64_t t = pc0; t < pc1;) {
          const int64_t n = t / nchunks, e = std::min(pc1, (n + 1) * nchunks);
          f(n, t, e, e - t < nchunks);
          t = e;
        }
      };
      bool any_split = false;
      for_segments([&](int64_t, int64_t t0, int64_t t1, bool split) {
        if (!split) return;
        claim_stats(t0, t1);
        any_split = true;
      });
      for_segments([&](int64_t n, int64_t t0, int64_t t1, bool split) {
        if (!split) { stats(t0, t1); apply(n, t0, t1, cf); }
      });
      if (!any_split) return;
      for_segments([&](int64_t n, int64_t t0, int64_t t1, bool split) {
        if (!split) return;
        claim_stats(n * nchunks, (n + 1) * nchunks);
        wait_done(n * nchunks, (n + 1) * nchunks);
        apply(n, t0, t1, cf);
      });
    };
    if (nt == 1) run(0, 1);
    else parallel_for(0, nt, 1, run);
  } else {
    parallel_for(0, N * C, std::max<int64_t>(1, 16384 / HW), [&](int64_t r0, int64_t r1) {
      k.row_stats(dt, px, HW, r0, r1, shift.data(), off.data(), m2.data());
    });
    std::vector<float> hi(N * C), a(N * C), b2(N * C), work(2 * C);
    for (int64_t n = 0; n < N; ++n) coefs(n, &hi[n * C], &a[n * C], &b2[n * C], work.data());
    parallel_for(0, N * C, std::max<int64_t>(1, 16384 / HW), [&](int64_t r0, int64_t r1) {
      k.row_affine(dt, px, py, HW, r0, r1, hi.data(), a.data(), b2.data(), silu);
    });
  }
  return y;
}

}  // namespace ddpm_fast::cpu

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("group_norm_silu", TORCH_BOX(&ddpm_fast::cpu::group_norm_silu_cpu)); }
