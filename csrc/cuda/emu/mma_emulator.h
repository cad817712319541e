// A functional model of the CUDA execution the tensor-core attention relies on, for running that kernel's code
// on a CPU (no GPU needed): one block at a time, each CUDA thread a cooperative fiber (ucontext), and
//   - __syncthreads() as a barrier of the block's fibers;
//   - warp collectives (__shfl_xor_sync, ldmatrix.x4 [.trans], mma.sync m16n8k16) as a rendezvous of the
//     warp's 32 fibers: the last to arrive checks that all 32 issued the same operation (a divergent collective
//     is an error), then computes every lane's result from all lanes' operands, following the PTX ISA's
//     fragment tables (written out again here, independently of the kernel's indexing);
//   - cp.async, in one of two modes: "late", a copy deferred until the issuing thread's cp.async.wait_group
//     releases its group, so a read before the wait (or, from another thread, before the barrier after it)
//     sees stale shared memory; or "early", a copy that lands at once, so overwriting a tile that another warp
//     may still be reading (a missing barrier before the next load) corrupts it;
//   - a round-robin schedule (every warp advances one step per pass) or a seeded random one in which warps
//     skip passes and drift apart, which is what exposes a missing barrier under "early" copies;
//   - shared memory filled with 0xFF bytes (NaN in fp16 / bf16) before each block, so reading what nothing
//     wrote shows up as NaN in the output;
//   - checks of every ldmatrix / cp.async address (alignment, inside shared memory / inside the registered
//     global buffers), and a count of ldmatrix bank conflicts (8-address phases hitting one 16-byte bank group).
// Products are exact in fp32 for fp16 / bf16 inputs, sums in fp32 in a fixed order (the hardware's order and
// truncation differ slightly; the tests' tolerances allow for it). Not a performance model.
//
// Used through DDPM_FAST_MMA_EMULATOR (see mma_primitives.cuh): include this header before any kernel header.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Host compilation of device code: the CUDA qualifiers mean nothing here.
#undef __device__
#define __device__
#undef __global__
#define __global__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)

// Device intrinsics the shared helpers use.
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

#include "../cuda_common.cuh"  // from_float / to_float, with the qualifiers above

namespace emu {

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "emulator: %s\n", what);
  std::abort();
}

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

enum class Op : int { None, Shfl, Ldsm, LdsmT, MmaF16, MmaBF16 };

struct LaneIn {
  Op op = Op::None;
  const void* addr = nullptr;  // ldmatrix row address
  float f = 0.f;               // shfl value
  int i = 0;                   // shfl lane mask
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
};

struct LaneOut {
  uint32_t r[4] = {};
  float f[4] = {};
};

struct Stats {
  long ldsm = 0, ldsm_conflict_phases = 0, ldsm_extra_wavefronts = 0, mma = 0, cp_async = 0, syncs = 0;
};

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  ucontext_t ctx{};
  std::vector<char> stack;
  Dim tid;
  bool done = false;
  std::vector<std::vector<PendingCopy>> groups;  // committed cp.async groups, oldest first
  std::vector<PendingCopy> open;                 // issued, not yet committed
};

struct Range {
  const unsigned char* lo;
  size_t bytes;
};

struct Runtime {
  std::vector<Fiber> fibers;
  int cur = -1;
  ucontext_t sched{};
  Dim block, grid, bdim;
  std::vector<unsigned char> smem;
  // block barrier
  int bar_count = 0;
  unsigned bar_gen = 0;
  // warp rendezvous
  struct Warp {
    int count = 0;
    unsigned gen = 0;
    LaneIn in[32];
    LaneOut out[32];
  };
  std::vector<Warp> warps;
  std::vector<Range> globals;  // buffers cp.async may read
  Stats stats;
  long progress = 0;  // arrivals, releases and exits: a scheduler pass without any is a deadlock
  bool cp_async_early = false;
  unsigned sched_seed = 0;  // 0: round-robin; otherwise warps skip passes at random (xorshift from this seed)
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline Fiber& me() { return rt().fibers[rt().cur]; }
inline void yield() { swapcontext(&me().ctx, &rt().sched); }

inline const Dim& cur_tid() { return me().tid; }
inline const Dim& cur_bid() { return rt().block; }
inline const Dim& cur_bdim() { return rt().bdim; }
inline const Dim& cur_gdim() { return rt().grid; }

inline void syncthreads() {
  Runtime& r = rt();
  ++r.stats.syncs;
  const unsigned gen = r.bar_gen;
  ++r.progress;
  if (++r.bar_count == static_cast<int>(r.fibers.size())) {
    r.bar_count = 0;
    ++r.bar_gen;
  } else {
    while (r.bar_gen == gen) yield();
  }
}

inline uint16_t bits16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_bits_to_float(uint16_t b) {
  __half h;
  std::memcpy(static_cast<void*>(&h), &b, 2);
  return __half2float(h);
}

inline void check_smem(const void* p, size_t bytes, const char* what) {
  Runtime& r = rt();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < r.smem.data() || c + bytes > r.smem.data() + r.smem.size()) die(what);
  if (static_cast<size_t>(c - r.smem.data()) % 16 != 0) die(what);
}

// Everything the warp's last-arriving lane computes for all 32 lanes.
inline void compute_collective(Runtime::Warp& w) {
  const Op op = w.in[0].op;
  for (int l = 1; l < 32; ++l)
    if (w.in[l].op != op) die("warp collective: lanes of one warp issued different operations (divergence)");
  Runtime& r = rt();
  switch (op) {
    case Op::Shfl:
      for (int l = 0; l < 32; ++l) {
        if (w.in[l].i != w.in[0].i) die("shfl_xor: lanes disagree on the lane mask");
        w.out[l].f[0] = w.in[l ^ w.in[l].i].f;
      }
      break;
    case Op::Ldsm:
    case Op::LdsmT: {
      ++r.stats.ldsm;
      for (int l = 0; l < 32; ++l) check_smem(w.in[l].addr, 16, "ldmatrix: row address misaligned or outside shared memory");
      // Bank conflicts: each matrix (8 row addresses of 16 bytes) is one phase; distinct 16-byte lines in the same
      // bank group (address / 16 mod 8) serialise.
      for (int m = 0; m < 4; ++m) {
        int used[8] = {};
        const unsigned char* seen[8][8];
        for (int j = 0; j < 8; ++j) {
          const unsigned char* p = static_cast<const unsigned char*>(w.in[8 * m + j].addr);
          const int bank = static_cast<int>((static_cast<size_t>(p - r.smem.data()) / 16) % 8);
          bool dup = false;
          for (int u = 0; u < used[bank]; ++u) dup |= seen[bank][u] == p;
          if (!dup) seen[bank][used[bank]++] = p;
        }
        int worst = 0;
        for (int b = 0; b < 8; ++b) worst = worst > used[b] ? worst : used[b];
        if (worst > 1) {
          ++r.stats.ldsm_conflict_phases;
          r.stats.ldsm_extra_wavefronts += worst - 1;
        }
      }
      // Lane t gets, from matrix m (rows supplied by lanes 8m..8m+7): row t/4, columns 2(t%4), 2(t%4)+1; with
      // .trans the matrix is transposed first: rows 2(t%4), 2(t%4)+1 of column t/4.
      for (int t = 0; t < 32; ++t)
        for (int m = 0; m < 4; ++m) {
          uint16_t lo, hi;
          if (op == Op::Ldsm) {
            const unsigned char* row = static_cast<const unsigned char*>(w.in[8 * m + t / 4].addr);
            lo = bits16(row + 2 * (2 * (t % 4)));
            hi = bits16(row + 2 * (2 * (t % 4) + 1));
          } else {
            const unsigned char* r0 = static_cast<const unsigned char*>(w.in[8 * m + 2 * (t % 4)].addr);
            const unsigned char* r1 = static_cast<const unsigned char*>(w.in[8 * m + 2 * (t % 4) + 1].addr);
            lo = bits16(r0 + 2 * (t / 4));
            hi = bits16(r1 + 2 * (t / 4));
          }
          w.out[t].r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      break;
    }
    case Op::MmaF16:
    case Op::MmaBF16: {
      ++r.stats.mma;
      auto val = [&](uint32_t reg, int half) {
        const uint16_t b = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
        return op == Op::MmaF16 ? half_bits_to_float(b) : bf16_bits_to_float(b);
      };
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const LaneIn& x = w.in[l];
        for (int e = 0; e < 2; ++e) {
          A[g][2 * t + e] = val(x.a[0], e);
          A[g + 8][2 * t + e] = val(x.a[1], e);
          A[g][2 * t + 8 + e] = val(x.a[2], e);
          A[g + 8][2 * t + 8 + e] = val(x.a[3], e);
          B[2 * t + e][g] = val(x.b[0], e);
          B[2 * t + 8 + e][g] = val(x.b[1], e);
        }
        C[g][2 * t] = x.c[0];
        C[g][2 * t + 1] = x.c[1];
        C[g + 8][2 * t] = x.c[2];
        C[g + 8][2 * t + 1] = x.c[3];
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
        for (int e = 0; e < 4; ++e) {
          float acc = 0.f;
          for (int k = 0; k < 16; ++k) acc += A[rows[e]][k] * B[k][cols[e]];
          w.out[l].f[e] = C[rows[e]][cols[e]] + acc;
        }
      }
      break;
    }
    default:
      die("warp collective: unknown operation");
  }
}

// This lane's part of a warp collective; returns its result once all 32 lanes have arrived.
inline const LaneOut& collective(const LaneIn& in) {
  Runtime& r = rt();
  const int tid = static_cast<int>(me().tid.x);
  const int lane = tid & 31;
  Runtime::Warp& w = r.warps[tid >> 5];
  w.in[lane] = in;
  const unsigned gen = w.gen;
  ++r.progress;
  if (++w.count == 32) {
    compute_collective(w);
    w.count = 0;
    ++w.gen;
  } else {
    while (w.gen == gen) yield();
  }
  return w.out[lane];
}

inline void apply(const std::vector<PendingCopy>& g) {
  if (rt().cp_async_early) return;  // landed when issued
  for (const PendingCopy& c : g) std::memcpy(c.dst, c.bytes, 16);
}

// Run `kernel` over grid x block (1-D blocks), one block after another.
inline void launch(Dim grid, int threads, size_t smem_bytes, const std::function<void()>& kernel) {
  Runtime& r = rt();
  r.grid = grid;
  r.bdim = Dim{static_cast<unsigned>(threads), 1, 1};
  if (threads % 32 != 0) die("launch: the block must be whole warps");
  static const std::function<void()>* body = nullptr;
  body = &kernel;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.block = Dim{x, y, z};
        r.smem.assign(smem_bytes, 0xFF);
        r.fibers.resize(threads);
        r.warps.assign(threads / 32, Runtime::Warp{});
        r.bar_count = 0;
        for (int i = 0; i < threads; ++i) {
          Fiber& f = r.fibers[i];
          f.tid = Dim{static_cast<unsigned>(i), 0, 0};
          f.done = false;
          f.groups.clear();
          f.open.clear();
          f.stack.resize(256 * 1024);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &r.sched;
          makecontext(&f.ctx, reinterpret_cast<void (*)()>(+[]() {
                        (*body)();
                        Fiber& self = me();
                        if (!self.open.empty() || !self.groups.empty())
                          die("a thread ended with cp.async copies it never waited for");
                        self.done = true;
                        ++rt().progress;
                      }),
                      0);
        }
        int alive = threads;
        uint32_t rng = r.sched_seed * 2654435761u + x * 97u + y * 13u + z + 1u;
        std::vector<char> skip(threads / 32, 0);
        while (alive > 0) {
          const long before = r.progress;
          if (r.sched_seed) {  // each warp sits out this pass with probability 1/2, but not all of them
            bool any = false;
            for (char& sk : skip) {
              rng ^= rng << 13;
              rng ^= rng >> 17;
              rng ^= rng << 5;
              sk = (rng >> 7) & 1;
              any |= !sk;
            }
            if (!any) std::fill(skip.begin(), skip.end(), 0);
          }
          alive = 0;
          for (int i = 0; i < threads; ++i) {
            if (r.fibers[i].done) continue;
            if (skip[i / 32]) {
              ++alive;
              continue;
            }
            r.cur = i;
            swapcontext(&r.sched, &r.fibers[i].ctx);
            if (!r.fibers[i].done) ++alive;
          }
          if (alive > 0 && r.progress == before && std::find(skip.begin(), skip.end(), 1) == skip.end())
            die(r.bar_count > 0 ? "deadlock: threads wait at __syncthreads that others never reach"
                                : "deadlock: a warp collective that some lanes never reach");
        }
        r.cur = -1;
      }
}

}  // namespace emu

#define threadIdx (::emu::cur_tid())
#define blockIdx (::emu::cur_bid())
#define blockDim (::emu::cur_bdim())
#define gridDim (::emu::cur_gdim())

inline void __syncthreads() { emu::syncthreads(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) emu::die("shfl_xor: only full-warp masks are modelled");
  emu::LaneIn in;
  in.op = emu::Op::Shfl;
  in.f = v;
  in.i = lane_mask;
  return emu::collective(in).f[0];
}

inline float __shfl_sync(unsigned, float, int) { emu::die("__shfl_sync is not modelled"); }

namespace ddpm_fast {
namespace cuda {
namespace mma {

#define DDPM_FAST_MMA_ARCH_OK 1

inline void ldsm_x4(uint32_t (&r)[4], const void* row) {
  emu::LaneIn in;
  in.op = emu::Op::Ldsm;
  in.addr = row;
  const emu::LaneOut& out = emu::collective(in);
  for (int i = 0; i < 4; ++i) r[i] = out.r[i];
}

inline void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  emu::LaneIn in;
  in.op = emu::Op::LdsmT;
  in.addr = row;
  const emu::LaneOut& out = emu::collective(in);
  for (int i = 0; i < 4; ++i) r[i] = out.r[i];
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::LaneIn in;
  in.op = sizeof(T) == 2 && std::is_same<T, __half>::value ? emu::Op::MmaF16 : emu::Op::MmaBF16;
  for (int i = 0; i < 4; ++i) in.a[i] = a[i];
  in.b[0] = b0;
  in.b[1] = b1;
  for (int i = 0; i < 4; ++i) in.c[i] = d[i];
  const emu::LaneOut& out = emu::collective(in);
  for (int i = 0; i < 4; ++i) d[i] = out.f[i];
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  const T l = ddpm_fast::cuda::from_float<T>(lo), h = ddpm_fast::cuda::from_float<T>(hi);
  uint16_t bl, bh;
  std::memcpy(&bl, static_cast<const void*>(&l), 2);
  std::memcpy(&bh, static_cast<const void*>(&h), 2);
  return static_cast<uint32_t>(bl) | (static_cast<uint32_t>(bh) << 16);
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  emu::Runtime& r = emu::rt();
  ++r.stats.cp_async;
  emu::check_smem(dst, 16, "cp.async: destination misaligned or outside shared memory");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::die("cp.async: source not 16-byte aligned");
  bool inside = false;
  const unsigned char* s = static_cast<const unsigned char*>(src);
  for (const emu::Range& g : r.globals) inside |= s >= g.lo && s + 16 <= g.lo + g.bytes;
  if (!inside) emu::die("cp.async: source outside every input buffer");
  emu::PendingCopy c;
  c.dst = dst;
  if (valid) std::memcpy(c.bytes, src, 16);
  else std::memset(c.bytes, 0, 16);
  if (r.cp_async_early) std::memcpy(dst, c.bytes, 16);
  emu::me().open.push_back(c);
}

inline void cp_async_commit() {
  emu::Fiber& f = emu::me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

template <int N>
inline void cp_async_wait() {
  emu::Fiber& f = emu::me();
  while (static_cast<int>(f.groups.size()) > N) {
    emu::apply(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

inline unsigned char* dynamic_smem() { return emu::rt().smem.data(); }

}  // namespace mma
}  // namespace cuda
}  // namespace ddpm_fast
