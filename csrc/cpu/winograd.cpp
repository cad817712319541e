// CPU 3x3 convolution (stride 1, padding 1) by Winograd F(2x2, 3x3) or F(4x4, 3x3): input transform, 16 or
// 36 GEMMs against a weight the caller transformed once (ddpm_fast.ops.winograd_weight; its first dimension
// says which), output transform with the bias, residual add, SiLU and output scale folded in. 2.25x (F2) or
// 4x (F4) fewer multiplies than the direct convolution, which at batch 1 is what bounds the UNet on a CPU;
// fp32 only.
//
// Four schedules, three chosen per call from the size of the transformed weight U (planes x C x O floats), the tile
// count T, the thread count and which GEMM is faster here (measured on 2-core AVX-512 machines, 2 MB L2 per core,
// a Xeon and a Zen 5 EPYC; see csrc/README.md):
//   pipeline, our GEMM (AVX512 builds, O >= 32, and U <= 3 MB or torch's GEMM without AVX-512 kernels here,
//     !torch_gemm_avx512(), where ours is about twice as fast at every size): one item per thread, a range of
//     tiles each, run in blocks of nb tiles: input transform -> the planes' GEMMs (the kernel table's GEMM,
//     single-threaded) -> output transform, with no synchronisation between stages or threads. nb is set so
//     that the block's V (planes x nb x C) and M (planes x nb x O) fill 3/4 of one core's L2; only x, U (read
//     once per block) and y move between cores and memory (faster than the batched schedule at 128 channels:
//     figures in bench/results/cpu-intel-xeon-avx512/).
//   pipeline, torch's GEMM (many tiles: T >= 2 x threads x nb): the same, with bigger blocks (3 x L2) whose
//     GEMMs go to torch's batched GEMM (MKL / oneDNN / OpenBLAS, sequential inside the parallel region). For
//     large U our GEMM loses to MKL's AVX-512 one on a Xeon (it streams U from L3 at about half MKL's rate),
//     and for O < 32 it wastes most of its 32-column panel.
//   batched (everything else, and every call of the DEFAULT build when there are few tiles): per block of
//     128 / 256 tiles, input transform (parallel_for), one torch bmm over all planes with all threads (each
//     reads its share of U, which is what bounds large-U layers at batch 1), output transform (parallel_for).
//   panels (the weight given as (planes, C_out / 16, C_in, 16) column panels, ddpm_fast.ops.winograd_weight's
//     panels=True; the caller picks it for few tiles): input transform (parallel_for), the planes' GEMMs as
//     the panel GEMM over contiguous ranges of (plane, panel) pairs, so that the threads read the weight once,
//     front to back, between them (kernels/panel_gemm_kernel.cpp), output transform (parallel_for). With few
//     tiles a GEMM is bound by the weight coming from memory, which the other schedules read in a strided order.
// DDPM_FAST_WINOGRAD_SCHEDULE=auto|pipeline|pipeline_torch|batched (read once; for tests) forces one of the
// first three for (planes, C_in, C_out) weights; pipeline falls back to pipeline_torch in builds without our GEMM.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <unistd.h>

#include "cpu/common.h"
#include "cpu/pool.h"

namespace ddpm_fast::cpu {

namespace {

enum class Schedule { Auto, Pipeline, PipelineTorch, Batched };

Schedule forced_schedule() {
  static const Schedule s = [] {
    const char* v = std::getenv("DDPM_FAST_WINOGRAD_SCHEDULE");
    const std::string want = v ? v : "";
    if (want == "pipeline") return Schedule::Pipeline;
    if (want == "pipeline_torch") return Schedule::PipelineTorch;
    if (want == "batched") return Schedule::Batched;
    DDPM_FAST_CHECK(want.empty() || want == "auto",
                    "DDPM_FAST_WINOGRAD_SCHEDULE must be auto, pipeline, pipeline_torch or batched, got '", want, "'");
    return Schedule::Auto;
  }();
  return s;
}

// One core's L2 (sysconf; 1 MiB when the C library does not know).
int64_t l2_bytes() {
  static const int64_t v = [] {
    int64_t s = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    s = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return s >= (256 << 10) ? s : int64_t(1) << 20;
  }();
  return v;
}

struct Geometry {
  const float* x;
  const Tensor* weight;
  const float* u;
  float* y;
  const float* bias;
  const float* residual;
  int64_t H, W, C, O, th, tw;
  int tile, planes;
  bool silu;
  float inv_scale;
};

// Tiles per block so that V (P x nb x C) and M (P x nb x O) fill `budget` bytes (at least one GEMM row group).
int64_t block_tiles(const Geometry& g, int64_t budget) {
  return std::max<int64_t>(12, budget / (4 * g.planes * (g.C + g.O)));
}

// Our GEMM's planes start 16 floats (a cache line) apart beyond their rows, so that the 16 / 36 planes' rows of
// one tile do not all fall on the same cache sets and 4 KiB aliases.
int64_t plane_stride(int64_t rows, int64_t cols) { return rows * cols + 16; }

// The per-thread pipeline: item i of min(threads, T) owns tiles [i T / items, (i + 1) T / items) and runs them in
// equal blocks of at most nb tiles. Each item takes its own V and M (one block's worth, at most a few times
// L2) from the pool (pool.h), which keeps them for the next call.
void run_pipeline(const Kernels& k, const Geometry& g, int64_t T, bool torch_gemm, int64_t budget) {
  const int64_t P = g.planes, C = g.C, O = g.O;
  const int64_t items = std::min<int64_t>(std::max<int64_t>(1, num_threads()), T);
  const int64_t nb_max = std::min(block_tiles(g, budget), (T + items - 1) / items);
  auto run_item = [&](int64_t item) {
    const int64_t ta = item * T / items, tb = (item + 1) * T / items;
    if (ta >= tb) return;
    const int64_t nblocks = (tb - ta + nb_max - 1) / nb_max, nb = (tb - ta + nblocks - 1) / nblocks;
    // Strides for a full block; torch's GEMM wants dense (P, rows, .) blocks, so with it a shorter last block
    // packs its planes with rows instead of nb (the same buffer, smaller strides).
    const int64_t v_floats = (P * plane_stride(nb, C) + 15) / 16 * 16;
    const PoolScratch mem(4 * (v_floats + P * plane_stride(nb, O)));
    float* V = mem.floats();
    float* M = V + v_floats;
    for (int64_t b0 = ta; b0 < tb; b0 += nb) {
      const int64_t rows = std::min(nb, tb - b0);
      const int64_t ldv = torch_gemm ? rows * C : plane_stride(rows, C), ldm = torch_gemm ? rows * O : plane_stride(rows, O);
      k.winograd_input(g.x, V, g.H, g.W, C, g.th, g.tw, b0, b0 + rows, ldv, g.tile);
      if (torch_gemm)
        bmm_out_cpu(cpu_float_blob(M, {P, rows, O}, {ldm, O, 1}), cpu_float_blob(V, {P, rows, C}, {ldv, C, 1}),
                    *g.weight);
      else
        k.winograd_gemm(V, ldv, C, g.u, C * O, O, M, ldm, O, rows, O, P);
      k.winograd_output(M, ldm, O, g.y, g.bias, g.residual, g.H, g.W, O, O, g.th, g.tw, b0, b0 + rows, g.silu,
                        g.inv_scale, g.tile);
    }
  };
  if (items == 1) {
    run_item(0);
    return;
  }
  parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) run_item(i);
  });
}

// Blocks of 128 (F4) / 256 (F2) tiles, each stage over all threads.
void run_batched(const Kernels& k, const Geometry& g, int64_t T) {
  const int64_t P = g.planes, C = g.C, O = g.O;
  // 256 tiles per block for F2, 128 for F4's 36 planes: each GEMM keeps 128-256 rows while V and M stay within
  // L2/L3 (1024-tile blocks made a 64x64, 128-channel layer twice as slow as the direct convolution).
  const int64_t block = std::min<int64_t>(T, g.tile == 2 ? 256 : 128);
  Tensor V = pooled(*g.weight, {P, block, C}), M = pooled(*g.weight, {P, block, O});
  for (int64_t b0 = 0; b0 < T; b0 += block) {
    const int64_t nb = std::min(block, T - b0);
    // The last block may be shorter: (planes, nb, .) views of the same buffers.
    const Tensor Vb = nb == block ? V : strided_view(V, {P, nb, C}, {nb * C, C, 1}, 0);
    const Tensor Mb = nb == block ? M : strided_view(M, {P, nb, O}, {nb * O, O, 1}, 0);
    float* pv = static_cast<float*>(Vb.mutable_data_ptr());
    parallel_for(b0, b0 + nb, std::max<int64_t>(1, 2048 / C), [&](int64_t t0, int64_t t1) {
      k.winograd_input(g.x, pv + (t0 - b0) * C, g.H, g.W, C, g.th, g.tw, t0, t1, nb * C, g.tile);
    });
    bmm_out_cpu(Mb, Vb, *g.weight);
    const float* pm = static_cast<const float*>(Mb.const_data_ptr());
    parallel_for(b0, b0 + nb, std::max<int64_t>(1, 2048 / O), [&](int64_t t0, int64_t t1) {
      k.winograd_output(pm + (t0 - b0) * O, nb * O, O, g.y, g.bias, g.residual, g.H, g.W, O, O, g.th, g.tw, t0, t1,
                        g.silu, g.inv_scale, g.tile);
    });
  }
}

// Few tiles, the weight in column panels (planes, O / 16, C, 16): every stage over all threads, the GEMMs split
// by (plane, panel) pair.
void run_panels(const Kernels& k, const Geometry& g, int64_t T) {
  const int64_t P = g.planes, C = g.C, O = g.O, np = O / 16;
  const PoolScratch mem(4 * P * T * (C + O));
  float* V = mem.floats();
  float* M = V + P * T * C;
  parallel_for(0, T, std::max<int64_t>(1, 2048 / C), [&](int64_t t0, int64_t t1) {
    k.winograd_input(g.x, V + t0 * C, g.H, g.W, C, g.th, g.tw, t0, t1, T * C, g.tile);
  });
  parallel_for(0, P * np, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t plane = i / np, p0 = i % np, p1 = std::min(np, p0 + (i1 - i));
      k.panel_gemm(V + plane * T * C, C, g.u + plane * O * C, C, M + plane * T * O, O, nullptr, nullptr, 0, T, p0, p1);
      i += p1 - p0;
    }
  });
  parallel_for(0, T, std::max<int64_t>(1, 2048 / O), [&](int64_t t0, int64_t t1) {
    k.winograd_output(M + t0 * O, T * O, O, g.y, g.bias, g.residual, g.H, g.W, O, O, g.th, g.tw, t0, t1, g.silu,
                      g.inv_scale, g.tile);
  });
}

}  // namespace

static Tensor conv3x3_winograd_cpu(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bias,
                                   const std::optional<Tensor>& residual, bool silu, double output_scale) {
  check_conv3x3_winograd(x_in, weight, bias, residual, output_scale, DeviceType::CPU);
  const bool panels = weight.dim() == 4;  // (planes, O / 16, C, 16) column panels
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t O = panels ? 16 * weight.size(1) : weight.size(2);
  auto channels_last = [](const Tensor& t) {
    return is_channels_last_contiguous(t) ? t : torch::stable::contiguous(t, MemoryFormat::ChannelsLast);
  };
  auto contiguous = [](const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); };
  const Tensor x = channels_last(x_in);
  Tensor y = pooled(x, {N, O, H, W}, MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const std::optional<Tensor> b = bias ? std::optional<Tensor>(contiguous(*bias)) : std::nullopt;
  const std::optional<Tensor> res = residual ? std::optional<Tensor>(channels_last(*residual)) : std::nullopt;
  const float* pb = b ? static_cast<const float*>(b->const_data_ptr()) : nullptr;
  const float* pr = res ? static_cast<const float*>(res->const_data_ptr()) : nullptr;
  float* py = static_cast<float*>(y.mutable_data_ptr());
  const float inv_scale = float(1.0 / output_scale);
  if (C == 0) {
    // No input channels: the convolution is the bias alone (then residual, SiLU, scale), pixel by pixel of the
    // channels_last output.
    for (int64_t i = 0; i < N * H * W; ++i)
      for (int64_t o = 0; o < O; ++o) {
        float v = (pb ? pb[o] : 0.f) + (pr ? pr[i * O + o] : 0.f);
        if (silu) v = v / (1.f + std::exp(-v));
        py[i * O + o] = output_scale != 1.0 ? v / float(output_scale) : v;
      }
    return y;
  }
  const Tensor w = contiguous(weight);
  const int tile = weight.size(0) == 36 ? 4 : 2, planes = (tile + 2) * (tile + 2);
  const int64_t th = (H + tile - 1) / tile, tw = (W + tile - 1) / tile, T = N * th * tw;
  const Geometry g{static_cast<const float*>(x.const_data_ptr()), &w, static_cast<const float*>(w.const_data_ptr()),
                   py, pb, pr, H, W, C, O, th, tw, tile, planes, silu, inv_scale};
  const auto& k = kernels();
  if (panels) {
    run_panels(k, g, T);
    return y;
  }
  const int64_t u_bytes = int64_t(planes) * C * O * 4, nt = std::max<int64_t>(1, num_threads());
  // Per-thread block budgets: 3/4 of L2 for our GEMM (V and M stay there); 3 x L2 for torch's (fewer blocks, so U is
  // read less often), at most 16 MiB a thread.
  const int64_t budget_own = l2_bytes() * 3 / 4, budget_torch = std::min<int64_t>(l2_bytes() * 3, int64_t(16) << 20);
  Schedule s = forced_schedule();
  if (s == Schedule::Auto) {
    if (k.winograd_gemm != nullptr && O >= 32 && (u_bytes <= (int64_t(3) << 20) || !torch_gemm_avx512()))
      s = Schedule::Pipeline;
    else if (T >= 2 * nt * block_tiles(g, budget_torch)) s = Schedule::PipelineTorch;
    else s = Schedule::Batched;
  }
  if (s == Schedule::Pipeline && k.winograd_gemm == nullptr) s = Schedule::PipelineTorch;
  if (s == Schedule::Pipeline) run_pipeline(k, g, T, false, budget_own);
  else if (s == Schedule::PipelineTorch) run_pipeline(k, g, T, true, budget_torch);
  else run_batched(k, g, T);
  return y;
}

}  // namespace ddpm_fast::cpu

STABLE_TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("conv3x3_winograd", TORCH_BOX(&ddpm_fast::cpu::conv3x3_winograd_cpu));
}
