// CPU GroupNorm (+ time-embedding add, + SiLU) in two passes: per-channel statistics over
// cache-sized pieces (shifted two-pass mean / M2, combined per group with Chan's formula in double), then one
// fused multiply-add + SiLU writing the output. NCHW works per channel row, channels_last per chunk of pixels.
// group_norm_silu_cat normalises the channel concatenation of two inputs the same way, reading each in place.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "cpu/common.h"
#include "cpu/pool.h"

namespace ddpm_fast::cpu {

static std::optional<Tensor> float_param(const std::optional<Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  // Already fp32 and dense (the usual case): skip the to / contiguous dispatcher round trips (~1 us each).
  if (dtype_of(*t) == ScalarType::Float && t->is_contiguous()) return *t;
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

// One input of the normalised channel concatenation: its data, its channels and the first of them in it.
struct Part {
  const char* p;
  int64_t c, c0;
};

// The op body for inputs xs (the parts of the channel concatenation, all in the same memory format: channels_last
// or contiguous, as `channels_last` says), already checked.
static Tensor group_norm_parts(const std::vector<Tensor>& xs, bool channels_last, int64_t num_groups,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                               const std::optional<Tensor>& temb, bool silu) {
  const Tensor& x = xs[0];
  std::vector<Part> parts;
  int64_t C = 0;
  for (const Tensor& t : xs) {
    parts.push_back({static_cast<const char*>(t.const_data_ptr()), t.size(1), C});
    C += t.size(1);
  }
  const int64_t N = x.size(0), HW = x.size(2) * x.size(3);
  Tensor y = pooled(x, {N, C, x.size(2), x.size(3)}, channels_last ? MemoryFormat::ChannelsLast : MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;

  const std::optional<Tensor> w = float_param(weight), b = float_param(bias), t = float_param(temb);
  const float* pw = w ? static_cast<const float*>(w->const_data_ptr()) : nullptr;
  const float* pb = b ? static_cast<const float*>(b->const_data_ptr()) : nullptr;
  const float* pt = t ? static_cast<const float*>(t->const_data_ptr()) : nullptr;
  const DType dt = kernel_dtype(dtype_of(x), "group_norm_silu", "x");
  const int64_t es = static_cast<int64_t>(x.element_size()), G = num_groups, Cg = C / G;
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
  if (channels_last)
    for (const Part& q : parts)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < q.c; ++c) shift[n * C + q.c0 + c] = element_as_float(dt, q.p, n * HW * q.c + c);

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
    // One parallel region for both passes: participant i owns pieces [lo(i), lo(i+1)), lo(i) = i*np/nt. A
    // sample whose pieces one call of `run` owns entirely is done start to finish while its slab is still in
    // L2 (statistics, coefficients, apply). A sample split across calls (batch 1) needs the statistics of all
    // its pieces before any of it is applied. Rather than a second fork/join (these ops take ~10-100 us, a
    // region costs a few us) the participants sharing it hand their statistics over through one claim flag
    // per participant and split sample: a call first claims and computes its own participants' parts; before
    // applying, it also claims and computes any part of the sample that nobody has claimed yet, and waits only
    // for parts another call has claimed and is computing. A claimed part is finished by a thread that is
    // running and waits for nothing meanwhile, so the wait is short and always ends, however
    // torch_parallel_for runs the calls: all at once, one after another (the first call then takes every part
    // itself) or as one nested call covering every participant. (The older design waited on a per-sample
    // counter, which needed all calls to run at once: an OpenMP team guarantees that, the stable
    // torch_parallel_for does not.)
    const int64_t np = N * nchunks;
    const int64_t work = N * C * HW;
    int64_t nt = std::min<int64_t>(num_threads(), np);
    if (work < 16384) nt = 1;
    // Below 128 pixels a sample is not worth splitting: the per-channel work every participant of a split sample
    // repeats (coefficients, statistics hand-over) outweighs its share of the pixels (batch 1 at 8x8 ran slower
    // on two threads than on one), so there are at most as many participants as samples.
    if (HW < 128) nt = std::min(nt, N);
    auto lo = [&](int64_t i) { return i * np / nt; };
    // A participant shares at most two samples with others: the one of its first piece (flag 2i) and the one
    // of its last (flag 2i + 1); each flag on its own cache line, written by the thread that computes that part.
    enum : uint8_t { kFree = 0, kClaimed = 1, kDone = 2 };
    struct alignas(64) Flag {
      std::atomic<uint8_t> v{kFree};
    };
    Flag local_flags[16];  // up to 8 threads without a heap allocation
    std::unique_ptr<Flag[]> heap_flags(nt > 8 ? new Flag[2 * nt] : nullptr);
    Flag* flags = nt > 8 ? heap_flags.get() : local_flags;
    auto stats = [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t n = task / nchunks, ch = task % nchunks, p0 = ch * P, p = std::min(P, HW - p0);
        for (const Part& q : parts)
          k.col_stats(dt, q.p + (n * HW + p0) * q.c * es, p, q.c, &shift[n * C + q.c0], &off[task * C + q.c0],
                      &m2[task * C + q.c0]);
      }
    };
    // Participants whose pieces include some of sample n, and participant i's part of it.
    auto participants_of = [&](int64_t n, int64_t& j0, int64_t& j1) {
      j0 = 0;
      while (lo(j0 + 1) <= n * nchunks) ++j0;
      j1 = j0;
      while (j1 < nt && lo(j1) < (n + 1) * nchunks) ++j1;
    };
    auto part = [&](int64_t i, int64_t n, int64_t& t0, int64_t& t1) {
      t0 = std::max(lo(i), n * nchunks);
      t1 = std::min(lo(i + 1), (n + 1) * nchunks);
      return t0 < t1;
    };
    auto flag = [&](int64_t i, int64_t n) -> std::atomic<uint8_t>& {
      return flags[2 * i + (lo(i) / nchunks == n ? 0 : 1)].v;
    };
    // Participant i's statistics of sample n, unless someone has claimed them.
    auto claim = [&](int64_t i, int64_t n) {
      int64_t t0, t1;
      if (!part(i, n, t0, t1)) return;
      std::atomic<uint8_t>& f = flag(i, n);
      uint8_t expected = kFree;
      if (f.load(std::memory_order_relaxed) != kFree ||
          !f.compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel))
        return;
      stats(t0, t1);
      f.store(kDone, std::memory_order_release);
    };
    auto wait_done = [&](int64_t i, int64_t n) {
      int64_t t0, t1;
      if (!part(i, n, t0, t1)) return;
      std::atomic<uint8_t>& f = flag(i, n);
      for (int spins = 0; f.load(std::memory_order_acquire) != kDone; ++spins) {
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
        for (const Part& q : parts)
          k.col_affine(dt, q.p + (n * HW + p0) * q.c * es, q.c, py + ((n * HW + p0) * C + q.c0) * es, C, p, q.c,
                       cf.data() + q.c0, cf.data() + C + q.c0, cf.data() + 2 * C + q.c0, silu);
      }
    };
    auto run = [&](int64_t i0, int64_t i1) {
      const int64_t pc0 = lo(i0), pc1 = lo(i1);
      std::vector<float> cf(5 * C);
      // Segments of [pc0, pc1) by sample; split ones are those not covering their whole sample.
      auto for_segments = [&](auto&& f) {
        for (int64_t t = pc0; t < pc1;) {
          const int64_t n = t / nchunks, e = std::min(pc1, (n + 1) * nchunks);
          f(n, t, e, e - t < nchunks);
          t = e;
        }
      };
      bool has_split = false;
      for_segments([&](int64_t n, int64_t, int64_t, bool split) {
        if (!split) return;
        for (int64_t i = i0; i < i1; ++i) claim(i, n);  // our own parts first
        has_split = true;
      });
      for_segments([&](int64_t n, int64_t t0, int64_t t1, bool split) {
        if (!split) { stats(t0, t1); apply(n, t0, t1, cf); }
      });
      if (!has_split) return;
      for_segments([&](int64_t n, int64_t t0, int64_t t1, bool split) {
        if (!split) return;
        int64_t j0, j1;
        participants_of(n, j0, j1);
        for (int64_t j = j0; j < j1; ++j) claim(j, n);  // parts nobody has started
        for (int64_t j = j0; j < j1; ++j) wait_done(j, n);
        apply(n, t0, t1, cf);
      });
    };
    if (nt == 1) run(0, 1);
    else parallel_for(0, nt, 1, run);
  } else {
    // Rows r = n * C + c of the concatenation, [r0, r1) cut at sample and part boundaries: f(part, n, c_lo,
    // c_hi) with c_lo, c_hi counted within the part.
    auto for_rows = [&](int64_t r0, int64_t r1, auto&& f) {
      for (int64_t r = r0; r < r1;) {
        const int64_t n = r / C, c = r % C;
        const Part* q = &parts[0];
        for (const Part& cand : parts)
          if (c >= cand.c0) q = &cand;
        const int64_t e = std::min(r1, n * C + q->c0 + q->c);
        f(*q, n, c - q->c0, e - n * C - q->c0);
        r = e;
      }
    };
    parallel_for(0, N * C, std::max<int64_t>(1, 16384 / HW), [&](int64_t r0, int64_t r1) {
      for_rows(r0, r1, [&](const Part& q, int64_t n, int64_t lo, int64_t hi) {
        const int64_t o = n * C + q.c0;
        k.row_stats(dt, q.p + n * q.c * HW * es, HW, lo, hi, &shift[o], &off[o], &m2[o]);
      });
    });
    std::vector<float> hi(N * C), a(N * C), b2(N * C), work(2 * C);
    for (int64_t n = 0; n < N; ++n) coefs(n, &hi[n * C], &a[n * C], &b2[n * C], work.data());
    parallel_for(0, N * C, std::max<int64_t>(1, 16384 / HW), [&](int64_t r0, int64_t r1) {
      for_rows(r0, r1, [&](const Part& q, int64_t n, int64_t lo, int64_t hi_c) {
        const int64_t o = n * C + q.c0;
        k.row_affine(dt, q.p + n * q.c * HW * es, py + o * HW * es, HW, lo, hi_c, &hi[o], &a[o], &b2[o], silu);
      });
    });
  }
  return y;
}

static Tensor group_norm_silu_cpu(const Tensor& x_in, int64_t num_groups, const std::optional<Tensor>& weight,
                                  const std::optional<Tensor>& bias, double eps, const std::optional<Tensor>& temb,
                                  bool silu) {
  DDPM_FAST_CHECK(x_in.dim() == 4, "group_norm_silu: x must be 4-D (N, C, H, W), got ", x_in.dim(), "-D shape ",
                  sizes_str(x_in.sizes()));
  check_group_norm_silu(x_in, num_groups, weight, bias, eps, temb, DeviceType::CPU);
  const bool channels_last = !x_in.is_contiguous() && is_channels_last_contiguous(x_in);
  const Tensor x = channels_last || x_in.is_contiguous() ? x_in : torch::stable::contiguous(x_in);
  return group_norm_parts({x}, channels_last, num_groups, weight, bias, eps, temb, silu);
}

// group_norm_silu(cat([x, skip], 1)) without the concatenation: the statistics and the output read both inputs
// where they are (an up block's skip connection).
static Tensor group_norm_silu_cat_cpu(const Tensor& x_in, const Tensor& skip_in, int64_t num_groups,
                                      const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                      double eps, bool silu) {
  check_group_norm_silu_cat(x_in, skip_in, num_groups, weight, bias, eps, DeviceType::CPU);
  // x's memory format decides the output's (as torch.cat does); skip is brought to it.
  const bool channels_last = !x_in.is_contiguous() && is_channels_last_contiguous(x_in);
  auto in_format = [&](const Tensor& t) {
    if (channels_last) return is_channels_last_contiguous(t) ? t : torch::stable::contiguous(t, MemoryFormat::ChannelsLast);
    return t.is_contiguous() ? t : torch::stable::contiguous(t);
  };
  return group_norm_parts({in_format(x_in), in_format(skip_in)}, channels_last, num_groups, weight, bias, eps,
                          std::nullopt, silu);
}

}  // namespace ddpm_fast::cpu

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_silu", TORCH_BOX(&ddpm_fast::cpu::group_norm_silu_cpu));
  m.impl("group_norm_silu_cat", TORCH_BOX(&ddpm_fast::cpu::group_norm_silu_cat_cpu));
}
