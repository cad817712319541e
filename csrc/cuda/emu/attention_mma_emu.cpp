// Runs the tensor-core attention kernel (csrc/cuda/attention_mma_kernels.cuh, unchanged) and the split-combine
// kernel on the CPU through the functional model in mma_emulator.h, against a float64 reference, at odd sizes,
// both dtypes, strided / unaligned / 3-D operands, D != Dv, with and without key splits. Builds the kernel
// arguments the way csrc/cuda/attention.cu does. Exit status 0 when every case passes.
//
//   bash csrc/cuda/emu/run.sh [filter]      (g++ only; no GPU, no torch)
//
// What it cannot show: speed, the hardware's own rounding / accumulation order, real memory-model races beyond
// the deferred-copy and barrier model, anything about the torch glue.
#define DDPM_FAST_MMA_EMULATOR "emu/mma_emulator.h"
#include "mma_emulator.h"

#include "../attention_mma_kernels.cuh"

#include <algorithm>
#include <cstring>
#include <random>
#include <string>

namespace dk = ddpm_fast::cuda;

namespace {

enum class Layout { Contiguous, PackedViews, Unaligned, ThreeD };

struct Case {
  int B, H, L, S, D, Dv;
  Layout layout;
  double scale;  // <= 0: 1 / sqrt(D)
  int sms;         // multiprocessors the plan assumes (132: H200)
  float qk_mul;    // q and k drawn with this standard deviation (large scores)
  int splits = 0;  // > 0: force this key split (the cost model leaves these small problems unsplit)
};

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Contiguous: return "contiguous";
    case Layout::PackedViews: return "packed-qkv-views";
    case Layout::Unaligned: return "unaligned";
    case Layout::ThreeD: return "3-D";
  }
  return "?";
}

template <typename T>
T to_t(float x);
template <>
__half to_t<__half>(float x) { return __float2half_rn(x); }
template <>
__nv_bfloat16 to_t<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
inline double from_t(__half x) { return __half2float(x); }
inline double from_t(__nv_bfloat16 x) { return __bfloat162float(x); }

// One operand: storage plus (batch, head, seq) element strides; last-dim stride 1.
template <typename T>
struct Operand {
  std::vector<T> store;
  const T* base = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;
  double at(int b, int h, int s, int d) const { return from_t(base[b * sb + h * sh + s * ss + d]); }
};

template <typename T>
bool run(const Case& c, double tol, bool verbose) {
  const int B = c.B, H = c.H, L = c.L, S = c.S, D = c.D, Dv = c.Dv;
  std::mt19937 gen(1234 + B * 7 + H * 11 + L * 13 + S * 17 + D * 19 + Dv * 23);
  std::normal_distribution<float> nd(0.f, 1.f);
  Operand<T> q, k, v;
  emu::rt().globals.clear();
  auto fill = [&](Operand<T>& o, int seq, int width, float mul, int64_t offset, int64_t sb, int64_t sh, int64_t ss,
                  size_t total) {
    o.store.assign(total + offset + 64, to_t<T>(std::nanf("")));  // NaN outside the operand's elements
    o.base = o.store.data() + offset;
    o.sb = sb;
    o.sh = sh;
    o.ss = ss;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int s = 0; s < seq; ++s)
          for (int d = 0; d < width; ++d)
            o.store[offset + b * sb + h * sh + s * ss + d] = to_t<T>(nd(gen) * mul);
    emu::rt().globals.push_back(
        {reinterpret_cast<const unsigned char*>(o.store.data()), o.store.size() * sizeof(T)});
  };
  std::vector<T> packed;
  if (c.layout == Layout::PackedViews) {
    // One (B, S, 3, H, D) projection (L == S, D == Dv), three (B, H, S, D) views.
    if (L != S || D != Dv) emu::die("packed views need L == S and D == Dv");
    const int64_t ss = 3LL * H * D, sh = D, sb = S * ss;
    Operand<T> all;
    fill(all, S, 3 * H * D, c.qk_mul, 0, sb, 0, ss, static_cast<size_t>(B) * sb);
    for (int i = 0; i < 3; ++i) {
      Operand<T>& o = i == 0 ? q : (i == 1 ? k : v);
      o.base = all.store.data() + i * H * D;
      o.sb = sb;
      o.sh = sh;
      o.ss = ss;
    }
    packed = std::move(all.store);
    emu::rt().globals.back().lo = reinterpret_cast<const unsigned char*>(packed.data());
    q.base = packed.data();
    k.base = packed.data() + H * D;
    v.base = packed.data() + 2 * H * D;
  } else {
    const int64_t off = c.layout == Layout::Unaligned ? 1 : 0;
    fill(q, L, D, c.qk_mul, off, int64_t(H) * L * D, int64_t(L) * D, D, size_t(B) * H * L * D);
    fill(k, S, D, c.qk_mul, 0, int64_t(H) * S * D, int64_t(S) * D, D, size_t(B) * H * S * D);
    fill(v, S, Dv, 1.f, 0, int64_t(H) * S * Dv, int64_t(S) * Dv, Dv, size_t(B) * H * S * Dv);
    if (c.layout == Layout::ThreeD) {  // (B, S, D) read as (B, 1, S, D): head stride 0
      if (H != 1) emu::die("3-D needs H == 1");
      q.sh = k.sh = v.sh = 0;
    }
  }

  // As attention.cu fills them.
  dk::AttnArgs a{};
  a.q = q.base;
  a.k = k.base;
  a.v = v.base;
  std::vector<T> out(size_t(B) * H * L * Dv, to_t<T>(std::nanf("")));
  a.out = out.data();
  a.q_sb = q.sb; a.q_sh = q.sh; a.q_ss = q.ss;
  a.k_sb = k.sb; a.k_sh = k.sh; a.k_ss = k.ss;
  a.v_sb = v.sb; a.v_sh = v.sh; a.v_ss = v.ss;
  a.H = H;
  a.BH = B * H;
  a.L = L;
  a.S = S;
  a.D = D;
  a.Dv = Dv;
  const double sc = c.scale > 0 ? c.scale : 1.0 / std::sqrt(double(D));
  a.qk_scale = static_cast<float>(sc * 1.4426950408889634);
  const int64_t vec = 16 / int64_t(sizeof(T));
  auto vec_tensor = [&](const Operand<T>& o) {
    return dk::is_aligned(o.base, 16) && o.sb % vec == 0 && o.sh % vec == 0 && o.ss % vec == 0;
  };
  a.vec_ok = D % vec == 0 && Dv % vec == 0 && vec_tensor(q) && vec_tensor(k) && vec_tensor(v);
  dk::attn_mma_plan(a, c.sms, 233472, c.splits);
  std::vector<float> part_o, part_ml;
  if (a.splits > 1) {
    part_o.assign(size_t(a.splits) * B * H * L * Dv, std::nanf(""));
    part_ml.assign(size_t(a.splits) * B * H * L * 2, std::nanf(""));
    a.part_o = part_o.data();
    a.part_ml = part_ml.data();
  }
  const size_t smem = dk::attn_mma_smem_bytes(a);
  const int dvc = dk::attn_mma_dv_chunk(Dv);
  const emu::Dim grid{unsigned(a.q_tiles * a.BH), unsigned(a.splits), unsigned((Dv + dvc - 1) / dvc)};
  emu::Stats before = emu::rt().stats;
  std::function<void()> body;
  switch (dvc) {
    case 64: body = [&] { dk::attention_mma_kernel<T, 64>(a); }; break;
    case 128: body = [&] { dk::attention_mma_kernel<T, 128>(a); }; break;
    default: body = [&] { dk::attention_mma_kernel<T, 256>(a); }; break;
  }
  emu::launch(grid, dk::kMmaThreads, smem, body);
  if (a.splits > 1)
    emu::launch(emu::Dim{unsigned(a.BH * L), 1, 1}, 128, 0, [&] { dk::attention_combine_kernel<T>(a); });
  const emu::Stats& after = emu::rt().stats;

  // float64 reference on the rounded inputs.
  double err = 0, ref_max = 0;
  bool finite = true;
  std::vector<double> w(S);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < L; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j < S; ++j) {
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += q.at(b, h, i, d) * k.at(b, h, j, d);
          w[j] = dot * sc;
          mx = std::max(mx, w[j]);
        }
        double sum = 0;
        for (int j = 0; j < S; ++j) sum += (w[j] = std::exp(w[j] - mx));
        for (int d = 0; d < Dv; ++d) {
          double r = 0;
          for (int j = 0; j < S; ++j) r += w[j] * v.at(b, h, j, d);
          r /= sum;
          const double o = from_t(out[((size_t(b) * H + h) * L + i) * Dv + d]);
          finite &= std::isfinite(o);
          err = std::max(err, std::fabs(o - r));
          ref_max = std::max(ref_max, std::fabs(r));
        }
      }
  const double rel = err / std::max(ref_max, 1e-6);
  const bool ok = finite && rel <= tol;
  const long ldsm = after.ldsm - before.ldsm;
  std::printf("%s %-5s B=%d H=%d L=%d S=%d D=%d Dv=%d %-16s sms=%d splits=%d chunks=%u vec=%d: rel err %.3g (tol %.3g)"
              " | ldmatrix %ld, conflicted phases %ld, mma %ld\n",
              ok ? "ok  " : "FAIL", sizeof(T) == 2 && std::is_same<T, __half>::value ? "fp16" : "bf16", B, H, L, S, D,
              Dv, layout_name(c.layout), c.sms, a.splits, grid.z, int(a.vec_ok), finite ? rel : NAN, tol, ldsm,
              after.ldsm_conflict_phases - before.ldsm_conflict_phases, after.mma - before.mma);
  (void)verbose;
  std::fflush(stdout);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  const int H200 = 132;
  const std::vector<Case> cases = {
      {1, 1, 1, 1, 16, 16, Layout::Contiguous, 0, H200, 1.f},          // one row, one key
      {1, 1, 7, 7, 40, 40, Layout::Contiguous, 0, H200, 1.f},          // D = 40: zero-filled chunk 5
      {1, 1, 83, 83, 64, 64, Layout::Contiguous, 0, H200, 1.f, 2},     // L, S not multiples of the tiles
      {2, 3, 37, 37, 64, 64, Layout::PackedViews, 0, H200, 1.f},       // the UNet's strided views
      {1, 1, 257, 45, 64, 40, Layout::Contiguous, 0, H200,    1.f},    // D != Dv, L > 4 tiles
      {1, 2, 20, 33, 7, 9, Layout::Contiguous, 0.3, H200, 1.f, 2},     // odd D / Dv: element loads, split
      {1, 1, 50, 70, 64, 64, Layout::Unaligned, 0, H200, 1.f},         // q at offset 1: element loads
      {3, 1, 20, 20, 32, 32, Layout::ThreeD, 0, H200, 1.f},            // (B, S, D)
      {1, 1, 65, 100, 256, 256, Layout::Contiguous, 0, H200, 1.f, 4},  // cifar10 head dim, split keys
      {1, 1, 65, 100, 256, 256, Layout::Contiguous, 0, H200,    1.f},  // same, no split
      {1, 1, 16, 300, 96, 300, Layout::Contiguous, 0, H200, 1.f, 5},   // Dv = 300: chunks of 256 and 44
      {1, 1, 33, 70, 512, 512, Layout::Contiguous, 0, H200, 1.f},      // 256-px head dim: two chunks
      {1, 1, 20, 64, 512, 64, Layout::Contiguous, 0, H200,    1.f},    // D = 512, Dv = 64
      {1, 1, 64, 64, 128, 128, Layout::Contiguous, 1.0, H200,    4.f}, // scores ~ 1e2..1e3: running max
      {2, 1, 16, 16, 256, 256, Layout::PackedViews, 0, H200, 1.f},     // mid-block 4x4 attention
      {1, 1, 100, 257, 48, 48, Layout::Contiguous, 0, H200, 1.f, 3},   // S = 257: last tile has 1 key
      {2, 2, 40, 90, 128, 296, Layout::Contiguous, 0, H200, 1.f, 2},   // Dv = 296: chunks of 256 and 40, cp.async
      {1, 1, 70, 256, 512, 512, Layout::Contiguous, 0, H200, 1.f},     // 256-px shape, split keys, two chunks
      {8, 1, 9, 17, 64, 64, Layout::Contiguous, 0, H200,    1.f},      // batch 8
  };
  int failed = 0, ran = 0;
  // Two models of timing: late copies under lock-step warps (a read before its wait / barrier sees stale data),
  // and early copies under drifting warps (a load before the barrier that ends the previous tile's reads
  // overwrites data still in use).
  const struct {
    bool early;
    unsigned seed;
    const char* name;
  } modes[] = {{false, 0, "cp.async late, lock-step warps"}, {true, 12345, "cp.async early, drifting warps"}};
  for (const auto& mode : modes) {
    emu::rt().cp_async_early = mode.early;
    emu::rt().sched_seed = mode.seed;
    std::printf("== %s\n", mode.name);
    for (const Case& c : cases) {
      char name[128];
      std::snprintf(name, sizeof name, "B=%d H=%d L=%d S=%d D=%d Dv=%d %s", c.B, c.H, c.L, c.S, c.D, c.Dv,
                    layout_name(c.layout));
      if (!filter.empty() && std::string(name).find(filter) == std::string::npos) continue;
      ++ran;
      // Relative to max |ref|: fp16 rounds P and the output at 2^-11, bf16 at 2^-8.
      failed += !run<__half>(c, 4e-3, false);
      failed += !run<__nv_bfloat16>(c, 3e-2, false);
    }
  }
  const emu::Stats& s = emu::rt().stats;
  std::printf("%s: %d case runs x 2 dtypes, %d failed; ldmatrix %ld (phases with bank conflicts %ld, extra wavefronts %ld), "
              "mma %ld, cp.async %ld, __syncthreads %ld\n",
              failed ? "FAILED" : "OK", ran, failed, s.ldsm, s.ldsm_conflict_phases, s.ldsm_extra_wavefronts, s.mma,
              s.cp_async, s.syncs);
  return failed ? 1 : 0;
}
