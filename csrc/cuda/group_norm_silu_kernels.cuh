// Fused (x + temb) -> GroupNorm -> affine -> SiLU for NCHW and NHWC (channels_last) tensors. CUDA headers only.
//
// Layouts: NHWC walks each group as HW rows of cpg contiguous channels (vector loads along C); NCHW walks the
// group's contiguous cpg*HW slab. Statistics are fp32 and numerically stable: each thread folds VEC values
// at a time (exact two-pass mean/M2 inside the vector) into a running (mean, M2, count) with Chan's combine,
// and threads/warps/blocks are merged the same way -- never E[x^2] - E[x]^2.
//
// Scheduling: when N*G blocks cannot fill the GPU (batch 1: 32 groups on 132 SMs), each group is split into
// `chunks`; pass 1 writes partial (mean, M2, count) per (n, g, chunk) into a small fp32 workspace, pass 2
// merges the partials of its group and applies the normalization to its chunk. With chunks == 1 a single
// kernel computes the statistics and applies them (the second read of the group hits L2).
#pragma once

#include "cuda_common.cuh"

namespace ddpm_fast {
namespace cuda {

struct GNArgs {
  const void* weight;  // (C,) or nullptr
  const void* bias;    // (C,) or nullptr
  const void* temb;    // (N, C) with strides temb_sn, temb_sc, or nullptr
  DType w_t, b_t, t_t;
  int64_t temb_sn, temb_sc;
  int64_t C, HW;
  int G, cpg;
  float eps;
  bool silu, nhwc;
  int chunks;             // blocks per group
  int64_t vec_per_chunk;  // vectors of VEC elements per chunk
  float* ws;              // (N*G*chunks*3) partial statistics, used when chunks > 1
};

constexpr int kGNThreads = 256;

__device__ __forceinline__ void welford_combine(float& mean, float& m2, float& n, float mean_b, float m2_b,
                                                float n_b) {
  const float nn = n + n_b;
  if (nn == 0.f) return;
  const float delta = mean_b - mean;
  const float wb = n_b / nn;
  mean += delta * wb;
  m2 += m2_b + delta * delta * n * wb;
  n = nn;
}

__device__ __forceinline__ void warp_welford(float& mean, float& m2, float& n) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float mb = __shfl_down_sync(0xffffffffu, mean, o);
    const float m2b = __shfl_down_sync(0xffffffffu, m2, o);
    const float nb = __shfl_down_sync(0xffffffffu, n, o);
    welford_combine(mean, m2, n, mb, m2b, nb);
  }
}

// Block-wide merge; every thread gets the result. `red` holds 3 * 32 floats.
__device__ __forceinline__ void block_welford(float& mean, float& m2, float& n, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nwarps = (blockDim.x + 31) >> 5;
  warp_welford(mean, m2, n);
  if (lane == 0) {
    red[warp * 3 + 0] = mean;
    red[warp * 3 + 1] = m2;
    red[warp * 3 + 2] = n;
  }
  __syncthreads();
  if (warp == 0) {
    mean = lane < nwarps ? red[lane * 3 + 0] : 0.f;
    m2 = lane < nwarps ? red[lane * 3 + 1] : 0.f;
    n = lane < nwarps ? red[lane * 3 + 2] : 0.f;
    warp_welford(mean, m2, n);
    if (lane == 0) {
      red[0] = mean;
      red[1] = m2;
      red[2] = n;
    }
  }
  __syncthreads();
  mean = red[0];
  m2 = red[1];
  n = red[2];
}

// Vectors per group.
template <int VEC>
__device__ __forceinline__ int64_t gn_nvec(const GNArgs& a) {
  return a.HW * a.cpg / VEC;
}

// Element offset of vector v of group (n, g), and the in-group channel of its first element.
// NHWC: the VEC elements are consecutive channels; NCHW: they share one channel (HW % VEC == 0).
template <int VEC>
__device__ __forceinline__ void gn_locate(const GNArgs& a, int64_t n, int g, int64_t v, int64_t& off, int& cl) {
  if (a.nhwc) {
    const int cv = a.cpg / VEC;
    const int64_t hw = v / cv;
    const int r = static_cast<int>(v - hw * cv);
    off = (n * a.HW + hw) * a.C + static_cast<int64_t>(g) * a.cpg + r * VEC;
    cl = r * VEC;
  } else {
    const int64_t e = v * VEC;
    cl = static_cast<int>(e / a.HW);
    off = (n * a.C + static_cast<int64_t>(g) * a.cpg) * a.HW + e;
  }
}

// Stage temb[n, group channels] in shared memory (zeros without temb). Caller syncs.
__device__ __forceinline__ void gn_stage_temb(const GNArgs& a, int64_t n, int g, float* t_s) {
  for (int c = threadIdx.x; c < a.cpg; c += blockDim.x) {
    t_s[c] = a.temb != nullptr
                 ? load_as_float(a.temb, a.t_t, n * a.temb_sn + (static_cast<int64_t>(g) * a.cpg + c) * a.temb_sc)
                 : 0.f;
  }
}

// This thread's (mean, M2, count) over vectors [v0, v1) of group (n, g), temb added.
template <typename T, int VEC>
__device__ __forceinline__ void gn_thread_stats(const T* __restrict__ x, const GNArgs& a, int64_t n, int g,
                                                int64_t v0, int64_t v1, const float* t_s, float& mean, float& m2,
                                                float& cnt) {
  mean = 0.f;
  m2 = 0.f;
  cnt = 0.f;
  for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    int64_t off;
    int cl;
    gn_locate<VEC>(a, n, g, v, off, cl);
    const Vec<T, VEC> xv = *reinterpret_cast<const Vec<T, VEC>*>(x + off);
    float vals[VEC];
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      vals[j] = to_float(xv.v[j]) + t_s[a.nhwc ? cl + j : cl];
      s += vals[j];
    }
    const float vm = s * (1.f / VEC);
    float vm2 = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = vals[j] - vm;
      vm2 += d * d;
    }
    welford_combine(mean, m2, cnt, vm, vm2, static_cast<float>(VEC));
  }
}

// Per-channel y = x * A[c] + B[c] with A = rstd * w, B = b + (temb - mean) * A. Caller syncs.
__device__ __forceinline__ void gn_stage_affine(const GNArgs& a, int g, float mean, float rstd, const float* t_s,
                                                float* a_s, float* b_s) {
  for (int c = threadIdx.x; c < a.cpg; c += blockDim.x) {
    const int64_t ch = static_cast<int64_t>(g) * a.cpg + c;
    const float w = a.weight != nullptr ? load_as_float(a.weight, a.w_t, ch) : 1.f;
    const float b = a.bias != nullptr ? load_as_float(a.bias, a.b_t, ch) : 0.f;
    const float A = rstd * w;
    a_s[c] = A;
    b_s[c] = b + (t_s[c] - mean) * A;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void gn_apply_range(const T* __restrict__ x, T* __restrict__ y, const GNArgs& a,
                                               int64_t n, int g, int64_t v0, int64_t v1, const float* a_s,
                                               const float* b_s) {
  for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    int64_t off;
    int cl;
    gn_locate<VEC>(a, n, g, v, off, cl);
    const Vec<T, VEC> xv = *reinterpret_cast<const Vec<T, VEC>*>(x + off);
    Vec<T, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = a.nhwc ? cl + j : cl;
      float o = to_float(xv.v[j]) * a_s[c] + b_s[c];
      if (a.silu) o = o / (1.f + __expf(-o));
      yv.v[j] = from_float<T>(o);
    }
    *reinterpret_cast<Vec<T, VEC>*>(y + off) = yv;
  }
}

// Pass 1 of the split path: grid (N*G, chunks).
template <typename T, int VEC>
__global__ void __launch_bounds__(kGNThreads) gn_partial_stats_kernel(const T* __restrict__ x, GNArgs a) {
  extern __shared__ float smem[];  // t_s[cpg]
  __shared__ float red[3 * 32];
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / a.G;
  const int g = static_cast<int>(ng - n * a.G);
  const int chunk = blockIdx.y;
  float* t_s = smem;
  gn_stage_temb(a, n, g, t_s);
  __syncthreads();
  const int64_t nvec = gn_nvec<VEC>(a);
  const int64_t v0 = chunk * a.vec_per_chunk;
  const int64_t v1 = v0 + a.vec_per_chunk < nvec ? v0 + a.vec_per_chunk : nvec;
  float mean, m2, cnt;
  gn_thread_stats<T, VEC>(x, a, n, g, v0, v1, t_s, mean, m2, cnt);
  block_welford(mean, m2, cnt, red);
  if (threadIdx.x == 0) {
    float* w = a.ws + (ng * a.chunks + chunk) * 3;
    w[0] = mean;
    w[1] = m2;
    w[2] = cnt;
  }
}

// FROM_WS: pass 2 of the split path (merge this group's partials, apply to this chunk), grid (N*G, chunks).
// Otherwise: one block per group computes the statistics and applies them, grid (N*G, 1).
template <typename T, int VEC, bool FROM_WS>
__global__ void __launch_bounds__(kGNThreads) gn_apply_kernel(const T* __restrict__ x, T* __restrict__ y, GNArgs a) {
  extern __shared__ float smem[];  // t_s[cpg] | a_s[cpg] | b_s[cpg]
  __shared__ float red[3 * 32];
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / a.G;
  const int g = static_cast<int>(ng - n * a.G);
  float* t_s = smem;
  float* a_s = smem + a.cpg;
  float* b_s = smem + 2 * a.cpg;
  gn_stage_temb(a, n, g, t_s);
  __syncthreads();

  const int64_t nvec = gn_nvec<VEC>(a);
  float mean, m2, cnt;
  int64_t v0 = 0, v1 = nvec;
  if (FROM_WS) {
    v0 = blockIdx.y * a.vec_per_chunk;
    v1 = v0 + a.vec_per_chunk < nvec ? v0 + a.vec_per_chunk : nvec;
    if (threadIdx.x < 32) {
      mean = 0.f;
      m2 = 0.f;
      cnt = 0.f;
      const float* w = a.ws + ng * a.chunks * 3;
      for (int c = threadIdx.x; c < a.chunks; c += 32) welford_combine(mean, m2, cnt, w[c * 3], w[c * 3 + 1], w[c * 3 + 2]);
      warp_welford(mean, m2, cnt);
      if (threadIdx.x == 0) {
        red[0] = mean;
        red[1] = m2;
        red[2] = cnt;
      }
    }
    __syncthreads();
    mean = red[0];
    m2 = red[1];
    cnt = red[2];
  } else {
    gn_thread_stats<T, VEC>(x, a, n, g, 0, nvec, t_s, mean, m2, cnt);
    block_welford(mean, m2, cnt, red);
  }
  const float var = cnt > 0.f ? fmaxf(m2 / cnt, 0.f) : 0.f;
  const float rstd = rsqrtf(var + a.eps);
  gn_stage_affine(a, g, mean, rstd, t_s, a_s, b_s);
  __syncthreads();
  gn_apply_range<T, VEC>(x, y, a, n, g, v0, v1, a_s, b_s);
}

template <typename T, int VEC>
void launch_group_norm_vec(const T* x, T* y, const GNArgs& a, int64_t N, cudaStream_t stream) {
  const dim3 block(kGNThreads);
  const int64_t ng = N * a.G;
  if (a.chunks > 1) {
    const dim3 grid(static_cast<unsigned>(ng), static_cast<unsigned>(a.chunks));
    gn_partial_stats_kernel<T, VEC><<<grid, block, a.cpg * sizeof(float), stream>>>(x, a);
    gn_apply_kernel<T, VEC, true><<<grid, block, 3 * a.cpg * sizeof(float), stream>>>(x, y, a);
  } else {
    const dim3 grid(static_cast<unsigned>(ng), 1);
    gn_apply_kernel<T, VEC, false><<<grid, block, 3 * a.cpg * sizeof(float), stream>>>(x, y, a);
  }
}

// Vectors per chunk so that roughly 4 blocks per SM run, with at least 4 vectors per thread per block (below
// that the second launch costs more than the parallelism gains).
inline void gn_plan_chunks(GNArgs& a, int64_t N, int vec, int sm_count) {
  const int64_t nvec = a.HW * a.cpg / vec;
  const int64_t ng = N * a.G;
  const int64_t target_blocks = static_cast<int64_t>(sm_count > 0 ? sm_count : 80) * 4;
  int64_t chunks = ceil_div(target_blocks, ng);
  const int64_t max_by_work = ceil_div(nvec, 4 * kGNThreads);
  chunks = std::max<int64_t>(1, std::min<int64_t>({chunks, max_by_work, 256}));
  a.vec_per_chunk = ceil_div(nvec, chunks);
  a.chunks = static_cast<int>(ceil_div(nvec, a.vec_per_chunk));  // no empty chunk
}

// Widest vector (<= 16 bytes) that keeps each vector inside one group (NHWC) or one channel (NCHW) and aligned.
template <typename T>
int gn_pick_vec(const void* x, const void* y, const GNArgs& a) {
  for (int vec = 16 / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    const bool fits = a.nhwc ? (a.cpg % vec == 0) : (a.HW % vec == 0);
    if (fits && is_aligned(x, vec * sizeof(T)) && is_aligned(y, vec * sizeof(T))) return vec;
  }
  return 1;
}

// Host entry. `a` must have everything but chunks / vec_per_chunk / ws set; `ws_alloc` returns a device buffer
// of the requested number of floats (the torch caching allocator in the glue).
template <typename T, typename WsAlloc>
void launch_group_norm(const T* x, T* y, GNArgs a, int64_t N, int sm_count, WsAlloc&& ws_alloc, cudaStream_t stream) {
  const int vec = gn_pick_vec<T>(x, y, a);
  gn_plan_chunks(a, N, vec, sm_count);
  a.ws = a.chunks > 1 ? ws_alloc(N * a.G * a.chunks * 3) : nullptr;
  switch (vec) {
    case 8: if constexpr (sizeof(T) == 2) { launch_group_norm_vec<T, 8>(x, y, a, N, stream); break; } [[fallthrough]];
    case 4: launch_group_norm_vec<T, 4>(x, y, a, N, stream); break;
    case 2: launch_group_norm_vec<T, 2>(x, y, a, N, stream); break;
    default: launch_group_norm_vec<T, 1>(x, y, a, N, stream); break;
  }
}

}  // namespace cuda
}  // namespace ddpm_fast
