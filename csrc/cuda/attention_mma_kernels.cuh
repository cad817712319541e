// Tensor-core attention for fp16 / bf16: softmax(q k^T * scale) v with mma.sync m16n8k16 (fp32 accumulation), an
// online (flash-style) softmax in fp32, head dims D, Dv <= 512 (kAttnMaxD). sm_80 and later. CUDA headers only.
//
// NOT YET RUN ON A GPU: compiled and linked for sm_80 / sm_90 by .ci/build_cuda.sh and run on the CPU through
// the functional model in csrc/cuda/emu/ only. The glue (attention.cu) takes it only when the environment has
// DDPM_FAST_CUDA_ATTENTION=mma; fp32, and fp16/bf16 without the variable, run attention_kernels.cuh.
//
// Tiling (FlashAttention-2 style). A block of 4 warps owns kMmaBQ = 64 query rows (16 per warp) and kDvc output
// columns (a compile-time chunk of Dv: 64, 128 or 256; Dv > 256 takes two chunks, grid.z, each recomputing
// q k^T) and walks the keys in tiles of kMmaBK = 32:
//   - Q (64 x D), the current K tile (32 x D) and V tile (32 x kDvc columns) sit in shared memory as T, written
//     by cp.async (16-byte copies, zero-filled past L / S / D / Dv), with 16-byte chunks XOR-swizzled by row
//     (chunk ^ (row & 7), rows a multiple of 64 elements wide) so that every ldmatrix phase hits 8 distinct
//     bank groups without padding.
//   - Each warp computes its 16 x 32 score tile S = Q K^T (ldmatrix A from Q, B from K, one k-step of 16 per
//     mma), scales it into the exp2 domain, masks keys >= S, and updates its rows' running max m and sum l;
//     P = exp2(S - m) stays in registers and is repacked as the A operand of P V (the m16n8 accumulator layout of
//     two adjacent key tiles is the m16k16 A layout), with V's B operand from ldmatrix.trans.
//   - The O accumulator (16 x kDvc fp32 per warp: kDvc / 2 registers per thread, 128 at kDvc = 256) is rescaled
//     by exp2(m_old - m_new) per tile and divided by l at the end.
//   - Loads overlap compute: V_t is in flight while S_t is computed, K_{t+1} while P V_t is.
// Shared memory: (64 + 32) * ld * 2 + 32 * kDvc * 2 bytes, ld = D rounded up to 64: 112 KiB at D = 512 and
// kDvc = 256 (two blocks per SM on sm_90's 228 KiB, one on sm_80's 164 KiB), 64 KiB at D = Dv = 256.
// When (query tiles x B*H x chunks) leaves most of the GPU idle the keys are split across blocks (grid.y) exactly
// as in attention_kernels.cuh: each writes unnormalised O and (m, l) to the fp32 workspace and
// attention_combine_kernel merges them (the split count comes from a rough cost model, attn_mma_plan).
#pragma once

#include "attention_kernels.cuh"  // AttnArgs, attention_combine_kernel
#include "cuda_common.cuh"
#include "mma_primitives.cuh"

namespace ddpm_fast {
namespace cuda {

constexpr int kMmaBQ = 64;
constexpr int kMmaBK = 32;
constexpr int kMmaWarps = kMmaBQ / 16;
constexpr int kMmaThreads = kMmaWarps * 32;

// Columns of O per block for a v head dim (the kernel's template argument).
inline int attn_mma_dv_chunk(int Dv) { return Dv <= 64 ? 64 : (Dv <= 128 ? 128 : 256); }

// Element offset of (row, col) in a swizzled tile whose rows are `width` elements (a multiple of 64) wide.
__device__ __forceinline__ int mma_swz(int row, int col, int width) {
  return row * width + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// Rows [0, rows) x chunks [0, chunks) of 8 elements of a swizzled tile from a (seq, ncols) matrix at `src` (row
// stride `row_stride`); source rows >= nrows and columns >= ncols read as zero. vec: cp.async 16-byte copies
// (src rows 16-byte aligned, ncols % 8 == 0); otherwise element by element (synchronous).
template <typename T>
__device__ __forceinline__ void mma_load_tile(T* dst, int width, int rows, int chunks, const T* src,
                                              int64_t row_stride, int nrows, int ncols, bool vec) {
  if (vec) {
    for (int i = threadIdx.x; i < rows * chunks; i += kMmaThreads) {
      const int r = i / chunks;
      const int ch = i - r * chunks;
      const bool ok = r < nrows && ch * 8 < ncols;
      mma::cp_async_16(dst + mma_swz(r, ch * 8, width), ok ? src + r * row_stride + ch * 8 : src, ok);
    }
  } else {
    const int cols = chunks * 8;
    const T zero = from_float<T>(0.f);
    for (int i = threadIdx.x; i < rows * cols; i += kMmaThreads) {
      const int r = i / cols;
      const int c = i - r * cols;
      dst[mma_swz(r, c, width)] = (r < nrows && c < ncols) ? src[r * row_stride + c] : zero;
    }
  }
}

template <typename T, int kDvc>
__global__ void __launch_bounds__(kMmaThreads) attention_mma_kernel(AttnArgs a) {
#if DDPM_FAST_MMA_ARCH_OK
  constexpr int NT = kDvc / 8;          // O n-tiles (8 columns) per warp
  constexpr int KT = kMmaBK / 8;        // score n-tiles (8 keys) per warp
  static_assert(KT == 4, "the P repacking below assumes 32-key tiles");
  T* Qs = reinterpret_cast<T*>(mma::dynamic_smem());
  T* Ks = Qs + kMmaBQ * a.ld;
  T* Vs = Ks + kMmaBK * a.ld;

  const int qt = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.q_tiles));
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.q_tiles));
  const int split = static_cast<int>(blockIdx.y);
  const int c0 = static_cast<int>(blockIdx.z) * kDvc;  // first O column of this block
  const int b = bh / a.H, h = bh - (bh / a.H) * a.H;
  const T* qb = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
  const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* vb = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh + c0;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int g = lane >> 2, t4 = lane & 3;

  const int64_t q0 = static_cast<int64_t>(qt) * kMmaBQ;
  const int qn = static_cast<int>(a.L - q0 < kMmaBQ ? a.L - q0 : kMmaBQ);
  const int dvn = a.Dv - c0 < kDvc ? a.Dv - c0 : kDvc;  // valid O columns of this block
  const int qk_chunks = a.Dp / 8;                        // D rounded up to 16, in chunks of 8
  const int v_chunks = (dvn + 15) / 16 * 2;              // what the P V loop reads
  const int ksteps = a.Dp / 16;

  const int t0 = split * a.tiles_per_split;
  const int t1 = t0 + a.tiles_per_split < a.kv_tiles ? t0 + a.tiles_per_split : a.kv_tiles;

  auto load_k = [&](int t) {
    const int64_t k0 = static_cast<int64_t>(t) * kMmaBK;
    const int kn = static_cast<int>(a.S - k0 < kMmaBK ? a.S - k0 : kMmaBK);
    mma_load_tile<T>(Ks, a.ld, kMmaBK, qk_chunks, kb + k0 * a.k_ss, a.k_ss, kn, a.D, a.vec_ok);
  };
  auto load_v = [&](int t) {
    const int64_t k0 = static_cast<int64_t>(t) * kMmaBK;
    const int kn = static_cast<int>(a.S - k0 < kMmaBK ? a.S - k0 : kMmaBK);
    mma_load_tile<T>(Vs, kDvc, kMmaBK, v_chunks, vb + k0 * a.v_ss, a.v_ss, kn, dvn, a.vec_ok);
  };

  // Prologue: group 1 = Q and K_t0, group 2 = V_t0. Invariant at the top of iteration t: the two newest
  // groups are K_t and V_t.
  mma_load_tile<T>(Qs, a.ld, kMmaBQ, qk_chunks, qb + q0 * a.q_ss, a.q_ss, qn, a.D, a.vec_ok);
  load_k(t0);
  mma::cp_async_commit();
  load_v(t0);
  mma::cp_async_commit();

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of this warp: running max (exp2 domain)
  float l[2] = {0.f, 0.f};              // this thread's share of the running sum

  const int qrow = warp * 16 + (lane & 15);  // ldmatrix row addresses (see mma_primitives.cuh)
  const int qcol = (lane >> 4) * 8;
  const int krow = (lane & 7) + ((lane >> 4) << 3);
  const int kcol = ((lane >> 3) & 1) * 8;
  const int vrow = (lane & 7) + (((lane >> 3) & 1) << 3);
  const int vcol = (lane >> 4) * 8;

  for (int t = t0; t < t1; ++t) {
    const int64_t k0 = static_cast<int64_t>(t) * kMmaBK;
    const int kn = static_cast<int>(a.S - k0 < kMmaBK ? a.S - k0 : kMmaBK);
    mma::cp_async_wait<1>();  // Q and K_t have landed (this thread's copies) ...
    __syncthreads();          // ... and everyone's

    // S = Q K_t^T: 16 rows x 32 keys per warp.
    float s[KT][4];
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll 2
    for (int kd = 0; kd < ksteps; ++kd) {
      uint32_t qa[4];
      mma::ldsm_x4(qa, Qs + mma_swz(qrow, kd * 16 + qcol, a.ld));
#pragma unroll
      for (int np = 0; np < KT / 2; ++np) {
        if (np * 16 < kn) {  // warp-uniform: key pairs past the end are all masked
          uint32_t kf[4];
          mma::ldsm_x4(kf, Ks + mma_swz(np * 16 + krow, kd * 16 + kcol, a.ld));
          mma::mma_16816<T>(s[2 * np], qa, kf[0], kf[1]);
          mma::mma_16816<T>(s[2 * np + 1], qa, kf[2], kf[3]);
        }
      }
    }

    // Online softmax in the exp2 domain. This thread holds keys 8j + 2 t4 + {0, 1} of rows g (e = 0, 1) and
    // g + 8 (e = 2, 3); the four threads of a quad share a row.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j * 8 + 2 * t4 + (e & 1);
        const float v = key < kn ? s[j][e] * a.qk_scale : -INFINITY;
        s[j][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    float alpha[2], lsum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);  // finite: key 0 of the tile is always valid
      alpha[r] = m[r] == -INFINITY ? 0.f : exp2f(m[r] - m_new);
      m[r] = m_new;
    }
#pragma unroll
    for (int j = 0; j < KT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[j][e] - m[e >> 1]);  // masked keys: exp2(-inf) = 0
        s[j][e] = p;
        lsum[e >> 1] += p;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + lsum[r];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    // P as the A operand of two k-steps of 16 keys: the accumulators of key tiles 2kk and 2kk + 1.
    uint32_t pa[KT / 2][4];
#pragma unroll
    for (int kk = 0; kk < KT / 2; ++kk) {
      pa[kk][0] = mma::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = mma::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = mma::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = mma::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }

    __syncthreads();  // every warp is done with K_t
    if (t + 1 < t1) load_k(t + 1);
    mma::cp_async_commit();
    mma::cp_async_wait<1>();  // V_t has landed (K_{t+1} may still be in flight)
    __syncthreads();

    // O += P V_t.
#pragma unroll
    for (int kk = 0; kk < KT / 2; ++kk) {
      if (kk * 16 < kn) {  // warp-uniform: P and V are zero past the last key
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          if (np * 16 < dvn) {  // warp-uniform: columns past Dv are never stored
            uint32_t vf[4];
            mma::ldsm_x4_trans(vf, Vs + mma_swz(kk * 16 + vrow, np * 16 + vcol, kDvc));
            mma::mma_16816<T>(o[2 * np], pa[kk], vf[0], vf[1]);
            mma::mma_16816<T>(o[2 * np + 1], pa[kk], vf[2], vf[3]);
          }
        }
      }
    }

    __syncthreads();  // every warp is done with V_t
    if (t + 1 < t1) load_v(t + 1);
    mma::cp_async_commit();
  }
  mma::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const bool pairs = (a.Dv & 1) == 0;  // row starts (and so every even column) 4-byte aligned
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = q0 + warp * 16 + g + r * 8;
    if (row >= a.L) continue;
    const int64_t orow = static_cast<int64_t>(bh) * a.L + row;
    if (a.splits == 1) {
      const float inv = 1.f / l[r];
      T* out = static_cast<T*>(a.out) + orow * a.Dv + c0;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int col = n * 8 + 2 * t4;
        if (col >= dvn) continue;
        const T x0 = from_float<T>(o[n][2 * r] * inv), x1 = from_float<T>(o[n][2 * r + 1] * inv);
        if (pairs) {
          Vec<T, 2> p2;
          p2.v[0] = x0;
          p2.v[1] = x1;
          *reinterpret_cast<Vec<T, 2>*>(out + col) = p2;
        } else {
          out[col] = x0;
          if (col + 1 < dvn) out[col + 1] = x1;
        }
      }
    } else {
      const int64_t prow = static_cast<int64_t>(split) * a.BH * a.L + orow;
      float* po = a.part_o + prow * a.Dv + c0;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int col = n * 8 + 2 * t4;
        if (col >= dvn) continue;
        if (pairs) {
          *reinterpret_cast<float2*>(po + col) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
        } else {
          po[col] = o[n][2 * r];
          if (col + 1 < dvn) po[col + 1] = o[n][2 * r + 1];
        }
      }
      if (blockIdx.z == 0 && t4 == 0) {
        a.part_ml[prow * 2 + 0] = m[r];
        a.part_ml[prow * 2 + 1] = l[r];
      }
    }
  }
#endif  // DDPM_FAST_MMA_ARCH_OK
}

inline size_t attn_mma_smem_bytes(const AttnArgs& a) {
  return (static_cast<size_t>(kMmaBQ + kMmaBK) * a.ld + static_cast<size_t>(kMmaBK) * attn_mma_dv_chunk(a.Dv)) * 2;
}

// The key-split choice weighs the compute time of each split count against the split's cost (the fp32 partial O
// written and read back, and the combine launch) with this rough model. Its constants are guesses for an
// A100 / H100-class GPU, not measurements: the GPU run (bench/gpu_check.sh, kernels_attention_mma.json) is what
// should tune them. Batch 1 at the UNets' shapes splits 3-4 ways; (8, 1, 256, 512) hardly gains either way.
constexpr double kMmaBlockFlopsPerSec = 1.5e12;  // one block alone on an SM
constexpr double kMmaSmFlopsPerSec = 2.4e12;     // an SM running two blocks
constexpr double kMmaWorkspaceBytesPerSec = 3e12;
constexpr double kMmaCombineSec = 2e-6;  // the combine kernel's launch and tail

// Fill the layout fields (Dp: D rounded up to 16; ld: Q/K tile row width, D rounded up to 64; Dvp: Dv rounded
// up to 8, unused) and the split plan. smem_per_sm: the device's shared memory per multiprocessor.
// force_splits > 0 imposes a split count (at most one per key tile; the CPU model uses it).
inline void attn_mma_plan(AttnArgs& a, int sm_count, int smem_per_sm, int force_splits = 0) {
  a.Dp = (a.D + 15) / 16 * 16;
  a.ld = (a.Dp + 63) / 64 * 64;
  a.Dvp = (a.Dv + 7) / 8 * 8;
  a.q_tiles = static_cast<int>(ceil_div(a.L, kMmaBQ));
  a.kv_tiles = static_cast<int>(ceil_div(a.S, kMmaBK));
  const int dvc = attn_mma_dv_chunk(a.Dv);
  const int64_t chunks = ceil_div(a.Dv, dvc);
  const int64_t base = static_cast<int64_t>(a.q_tiles) * a.BH * chunks;
  const int64_t sms = sm_count > 0 ? sm_count : 80;
  // Resident blocks per SM, by shared memory (1 KiB of it reserved per block), at most 2 (registers: 212 per
  // thread at dvc = 256).
  const int64_t smem = static_cast<int64_t>(attn_mma_smem_bytes(a)) + 1024;
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(2, (smem_per_sm > 0 ? smem_per_sm : 160 * 1024) / smem));
  auto use = [&](int64_t splits) {
    a.tiles_per_split = static_cast<int>(ceil_div(a.kv_tiles, splits));
    a.splits = static_cast<int>(ceil_div(a.kv_tiles, a.tiles_per_split));
  };
  if (force_splits > 0) {
    use(std::min<int64_t>(force_splits, a.kv_tiles));
    return;
  }
  // Flops of the whole call (q k^T once per Dv chunk), spread over the blocks of a split count.
  const double flops = 2.0 * a.BH * static_cast<double>(a.L) * static_cast<double>(a.S) *
                       (static_cast<double>(chunks) * a.D + a.Dv);
  const double rows = static_cast<double>(a.BH) * static_cast<double>(a.L);
  double best = 0;
  int64_t best_splits = 1;
  // At least two key tiles per split (a split re-reads Q), at most 16 splits.
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(16, a.kv_tiles / 2));
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t tps = ceil_div(a.kv_tiles, s);
    const int64_t splits = ceil_div(a.kv_tiles, tps);
    if (s > 1 && splits == best_splits) continue;
    const int64_t blocks = base * splits;
    const int64_t waves = ceil_div(blocks, sms * per_sm);
    const bool two_per_sm = per_sm > 1 && blocks > sms;
    const double block_rate = two_per_sm ? kMmaSmFlopsPerSec / 2 : kMmaBlockFlopsPerSec;
    double t = static_cast<double>(waves) * (flops / static_cast<double>(base) * static_cast<double>(tps) /
                                             static_cast<double>(a.kv_tiles)) / block_rate;
    if (splits > 1) t += static_cast<double>(splits) * rows * a.Dv * 8.0 / kMmaWorkspaceBytesPerSec + kMmaCombineSec;
    if (s == 1 || t < best) {
      best = t;
      best_splits = splits;
    }
  }
  use(best_splits);
}

#if !defined(DDPM_FAST_MMA_EMULATOR)
template <typename T, int kDvc>
cudaError_t launch_attention_mma_impl(const AttnArgs& a, cudaStream_t stream) {
  const size_t smem = attn_mma_smem_bytes(a);
  auto kernel = attention_mma_kernel<T, kDvc>;
  if (smem > 48 * 1024) {
    // Opt in to large dynamic shared memory (not a stream operation: fine under graph capture).
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(a.q_tiles) * a.BH), static_cast<unsigned>(a.splits),
                  static_cast<unsigned>(ceil_div(a.Dv, kDvc)));
  kernel<<<grid, kMmaThreads, smem, stream>>>(a);
  if (a.splits > 1) {
    attention_combine_kernel<T><<<static_cast<unsigned>(static_cast<int64_t>(a.BH) * a.L), 128, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// Host entry; `a` planned with attn_mma_plan (part_o / part_ml allocated when a.splits > 1). T: __half or
// __nv_bfloat16.
template <typename T>
cudaError_t launch_attention_mma(const AttnArgs& a, cudaStream_t stream) {
  switch (attn_mma_dv_chunk(a.Dv)) {
    case 64: return launch_attention_mma_impl<T, 64>(a, stream);
    case 128: return launch_attention_mma_impl<T, 128>(a, stream);
    default: return launch_attention_mma_impl<T, 256>(a, stream);
  }
}
#endif  // !DDPM_FAST_MMA_EMULATOR

}  // namespace cuda
}  // namespace ddpm_fast
