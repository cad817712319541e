// softmax(q k^T * scale) v for q (B*H, L, D), k (B*H, S, D), v (B*H, S, Dv); D, Dv <= 512; fp32 accumulation.
// CUDA headers only.
//
// Flash-style: a block owns kBQ = 32 query rows (8 warps x 4 rows) and walks the keys in tiles of kBK = 32.
// Q and the current K (then V) tile sit in shared memory as fp32 (rows padded so float4 reads are
// conflict-free); lane j of a warp scores key j against the warp's 4 rows, an online softmax keeps the
// running max / sum in registers, and each lane accumulates a float4 column strip of O (up to 512 columns =
// 4 strips of 128). Everything is on CUDA cores: fp32 always takes it; fp16 / bf16 take the tensor-core kernel of
// attention_mma_kernels.cuh instead when DDPM_FAST_CUDA_ATTENTION=mma (attention.cu).
// When (query tiles x B*H) cannot fill the GPU (batch 1, S = 256) the keys are split across `splits` blocks
// which write unnormalized partial O plus (max, sum) and a second kernel merges them.
#pragma once

#include "cuda_common.cuh"
#include "kernel_limits.h"

namespace ddpm_fast {
namespace cuda {

constexpr int kAttnBQ = 32;
constexpr int kAttnBK = 32;
constexpr int kAttnWarps = 8;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kAttnRowsPerWarp = kAttnBQ / kAttnWarps;  // 4
constexpr int kAttnMaxD = limits::kCudaAttentionMaxHeadDim;  // csrc/kernel_limits.h, also read by Python

struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;  // (BH, L, Dv) contiguous, input dtype
  int64_t q_sb, q_sh, q_ss;  // element strides of batch, head, sequence (last dim stride is 1)
  int64_t k_sb, k_sh, k_ss;
  int64_t v_sb, v_sh, v_ss;
  int H;
  int BH;
  int64_t L, S;   // query and key lengths
  int D, Dp;    // q/k head dim and the same padded to a multiple of 4
  int Dv, Dvp;  // v head dim, padded
  int ld;       // shared-memory row stride (floats)
  float qk_scale;  // scale * log2(e): scores live in the exp2 domain
  int q_tiles, kv_tiles, splits, tiles_per_split;
  bool vec_ok;        // 16-byte global loads allowed (q, k, v)
  float* part_o;      // (splits, BH, L, Dv) when splits > 1
  float* part_ml;     // (splits, BH, L, 2): running max and sum
  // The tensor-core kernel (attention_mma_kernels.cuh, attn_mma_plan) reads Dp as D rounded up to 16 and ld as
  // its Q/K tile row width (D rounded up to 64, in elements), and writes part_o / part_ml in the same layout.
};

// Copy rows [row0, row0 + nrows) (nrows <= 32), columns [0, ncols) of one (seq, ncols) matrix into a 32 x ld fp32
// shared tile, multiplying by `mul`; rows >= nrows and columns in [ncols, ncols_p) are zero.
template <typename T>
__device__ __forceinline__ void attn_load_tile(float* __restrict__ dst, const T* __restrict__ src, int64_t row_stride,
                                               int64_t row0, int nrows, int ncols, int ncols_p,
                                               const AttnArgs& a, float mul) {
  constexpr int VEC = 16 / sizeof(T);
  if (a.vec_ok) {
    const int per_row = ncols / VEC;
    for (int i = threadIdx.x; i < 32 * per_row; i += blockDim.x) {
      const int r = i / per_row;
      const int cv = i - r * per_row;
      float* d = dst + r * a.ld + cv * VEC;
      if (r < nrows) {
        const Vec<T, VEC> x = *reinterpret_cast<const Vec<T, VEC>*>(src + (row0 + r) * row_stride + cv * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) d[j] = to_float(x.v[j]) * mul;
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) d[j] = 0.f;
      }
    }
    // vec_ok implies ncols % 4 == 0, so ncols_p == ncols: no padding columns to clear.
  } else {
    for (int i = threadIdx.x; i < 32 * ncols_p; i += blockDim.x) {
      const int r = i / ncols_p;
      const int c = i - r * ncols_p;
      dst[r * a.ld + c] = (r < nrows && c < ncols) ? to_float(src[(row0 + r) * row_stride + c]) * mul : 0.f;
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// MAXC: float4 column strips of 128 output columns per lane (1: Dv <= 128, 2: Dv <= 256, 4: Dv <= 512).
template <typename T, int MAXC>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(AttnArgs a) {
  extern __shared__ float4 attn_smem4[];
  float* Qs = reinterpret_cast<float*>(attn_smem4);
  float* KVs = Qs + kAttnBQ * a.ld;
  constexpr int R = kAttnRowsPerWarp;

  const int qt = blockIdx.x % a.q_tiles;
  const int bh = blockIdx.x / a.q_tiles;
  const int split = blockIdx.y;
  const int b = bh / a.H, h = bh - (bh / a.H) * a.H;
  const T* qb = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
  const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* vb = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t q0 = static_cast<int64_t>(qt) * kAttnBQ;
  const int qn = static_cast<int>(a.L - q0 < kAttnBQ ? a.L - q0 : kAttnBQ);

  attn_load_tile<T>(Qs, qb, a.q_ss, q0, qn, a.D, a.Dp, a, a.qk_scale);

  float m[R], l[R], acc[R][MAXC][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;  // this lane's share of the row sum
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][c][e] = 0.f;
  }

  const int t0 = split * a.tiles_per_split;
  const int t1 = t0 + a.tiles_per_split < a.kv_tiles ? t0 + a.tiles_per_split : a.kv_tiles;
  const float* qrow = Qs + warp * R * a.ld;
  for (int t = t0; t < t1; ++t) {
    const int64_t k0 = static_cast<int64_t>(t) * kAttnBK;
    const int kn = static_cast<int>(a.S - k0 < kAttnBK ? a.S - k0 : kAttnBK);
    __syncthreads();  // Q is loaded / the previous tile's V is no longer read
    attn_load_tile<T>(KVs, kb, a.k_ss, k0, kn, a.D, a.Dp, a, 1.f);
    __syncthreads();

    // Scores of key `lane` against this warp's R query rows.
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = 0.f;
    const float* krow = KVs + lane * a.ld;
    for (int d = 0; d < a.Dp; d += 4) {
      const float4 kk = *reinterpret_cast<const float4*>(krow + d);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 qq = *reinterpret_cast<const float4*>(qrow + r * a.ld + d);
        s[r] = fmaf(qq.x, kk.x, fmaf(qq.y, kk.y, fmaf(qq.z, kk.z, fmaf(qq.w, kk.w, s[r]))));
      }
    }

    // Online softmax (exp2 domain; scale already folded into Q).
    float p[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float sr = lane < kn ? s[r] : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(sr));  // finite: key 0 of the tile is always valid
      const float alpha = m[r] == -INFINITY ? 0.f : exp2f(m[r] - m_new);
      p[r] = lane < kn ? exp2f(sr - m_new) : 0.f;
      l[r] = l[r] * alpha + p[r];
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < MAXC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][c][e] *= alpha;
    }

    __syncthreads();  // every warp is done with K
    attn_load_tile<T>(KVs, vb, a.v_ss, k0, kn, a.Dv, a.Dvp, a, 1.f);
    __syncthreads();

    for (int j = 0; j < kn; ++j) {
      float pj[R];
#pragma unroll
      for (int r = 0; r < R; ++r) pj[r] = __shfl_sync(0xffffffffu, p[r], j);
      const float* vrow = KVs + j * a.ld;
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int d = c * 128 + lane * 4;
        if (d < a.Dvp) {
          const float4 vv = *reinterpret_cast<const float4*>(vrow + d);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            acc[r][c][0] = fmaf(pj[r], vv.x, acc[r][c][0]);
            acc[r][c][1] = fmaf(pj[r], vv.y, acc[r][c][1]);
            acc[r][c][2] = fmaf(pj[r], vv.z, acc[r][c][2]);
            acc[r][c][3] = fmaf(pj[r], vv.w, acc[r][c][3]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float lsum = warp_sum(l[r]);
    const int64_t row = q0 + warp * R + r;
    if (row >= a.L) continue;
    const int64_t orow = static_cast<int64_t>(bh) * a.L + row;
    if (a.splits == 1) {
      const float inv = 1.f / lsum;
      T* o = static_cast<T*>(a.out) + orow * a.Dv;
#pragma unroll
      for (int c = 0; c < MAXC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int d = c * 128 + lane * 4 + e;
          if (d < a.Dv) o[d] = from_float<T>(acc[r][c][e] * inv);
        }
    } else {
      const int64_t prow = static_cast<int64_t>(split) * a.BH * a.L + orow;
      float* o = a.part_o + prow * a.Dv;
#pragma unroll
      for (int c = 0; c < MAXC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int d = c * 128 + lane * 4 + e;
          if (d < a.Dv) o[d] = acc[r][c][e];
        }
      if (lane == 0) {
        a.part_ml[prow * 2 + 0] = m[r];
        a.part_ml[prow * 2 + 1] = lsum;
      }
    }
  }
}

// Merge the key splits: out = sum_i w_i O_i / sum_i w_i l_i with w_i = 2^(m_i - max m). One block per row.
template <typename T>
__global__ void attention_combine_kernel(AttnArgs a) {
  const int64_t orow = blockIdx.x;  // bh * L + row
  const int64_t rows = static_cast<int64_t>(a.BH) * a.L;
  float mx = -INFINITY;
  for (int i = 0; i < a.splits; ++i) mx = fmaxf(mx, a.part_ml[(i * rows + orow) * 2]);
  float denom = 0.f;
  for (int i = 0; i < a.splits; ++i) {
    const float* ml = a.part_ml + (i * rows + orow) * 2;
    denom += exp2f(ml[0] - mx) * ml[1];
  }
  const float inv = 1.f / denom;
  T* o = static_cast<T*>(a.out) + orow * a.Dv;
  for (int d = threadIdx.x; d < a.Dv; d += blockDim.x) {
    float sum = 0.f;
    for (int i = 0; i < a.splits; ++i) {
      const float w = exp2f(a.part_ml[(i * rows + orow) * 2] - mx);
      sum += w * a.part_o[(i * rows + orow) * a.Dv + d];
    }
    o[d] = from_float<T>(sum * inv);
  }
}

inline size_t attn_smem_bytes(int ld) { return static_cast<size_t>(kAttnBQ + kAttnBK) * ld * sizeof(float); }

// Fill D-dependent layout fields and the split plan. Call before allocating the workspace.
inline void attn_plan(AttnArgs& a, int sm_count) {
  a.Dp = (a.D + 3) / 4 * 4;
  a.Dvp = (a.Dv + 3) / 4 * 4;
  const int width = a.Dp > a.Dvp ? a.Dp : a.Dvp;
  // Row stride with (ld / 4) odd: float4 reads of 8 consecutive rows hit 8 distinct bank quads.
  a.ld = ((width / 4) % 2 == 1) ? width : width + 4;
  a.q_tiles = static_cast<int>(ceil_div(a.L, kAttnBQ));
  a.kv_tiles = static_cast<int>(ceil_div(a.S, kAttnBK));
  const int64_t base = static_cast<int64_t>(a.q_tiles) * a.BH;
  // At D > 256 one block fits per SM (about 130 KB of shared memory); smaller D fits more.
  const int per_sm = width > 256 ? 1 : (width > 128 ? 2 : 4);
  const int64_t target = static_cast<int64_t>(sm_count > 0 ? sm_count : 80) * per_sm;
  int64_t splits = base >= target ? 1 : ceil_div(target, base);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, a.kv_tiles, 32}));
  a.tiles_per_split = static_cast<int>(ceil_div(a.kv_tiles, splits));
  a.splits = static_cast<int>(ceil_div(a.kv_tiles, a.tiles_per_split));
}

// (csrc/cuda/emu/ compiles the kernels above on the host, where <<<...>>> does not parse.)
#if !defined(DDPM_FAST_MMA_EMULATOR)
template <typename T, int MAXC>
cudaError_t launch_attention_impl(const AttnArgs& a, cudaStream_t stream) {
  const size_t smem = attn_smem_bytes(a.ld);
  auto kernel = attention_kernel<T, MAXC>;
  if (smem > 48 * 1024) {
    // Opt in to large dynamic shared memory (not a stream operation: fine under graph capture).
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(a.q_tiles) * a.BH), static_cast<unsigned>(a.splits));
  kernel<<<grid, kAttnThreads, smem, stream>>>(a);
  if (a.splits > 1) {
    attention_combine_kernel<T><<<static_cast<unsigned>(static_cast<int64_t>(a.BH) * a.L), 128, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// Host entry; `a` planned with attn_plan (and part_o / part_ml allocated when a.splits > 1).
template <typename T>
cudaError_t launch_attention(const AttnArgs& a, cudaStream_t stream) {
  if (a.Dv <= 128) return launch_attention_impl<T, 1>(a, stream);
  if (a.Dv <= 256) return launch_attention_impl<T, 2>(a, stream);
  return launch_attention_impl<T, 4>(a, stream);
}
#endif  // !DDPM_FAST_MMA_EMULATOR

}  // namespace cuda
}  // namespace ddpm_fast
