// One elementwise pass of a DDPM/DDIM step (CUDA headers only):
//   x0   = a_x * sample + a_e * model_output          (clamped to +-clip when has_clip)
//   prev = c0 * x0 + c1 * sample + c2 * model_output + noise_scale * noise   (noise term only when noise != nullptr)
// fp32 math, outputs in the input type. All tensors share one dense layout, so the kernel walks raw storage.
// The coefficients come either by value (scheduler_step) or from row *index of a device table
// (scheduler_step_table: read by every thread at kernel start, so no host ever syncs for them and a CUDA graph
// replays the step with whatever index the caller wrote in place).
#pragma once

#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "kernel_types.h"

namespace ddpm_fast {
namespace cuda {

using ddpm_fast::StepCoefs;

// Row *index of a (rows, kStepTableCols) fp32 table with element strides s0, s1 (columns: kernel_types.h).
struct StepTable {
  const float* coefs;
  const int64_t* index;
  int64_t rows, s0, s1;
};

__device__ __forceinline__ void step_one(float e, float s, float n, const StepCoefs& k, float& prev, float& x0) {
  float x = k.a_x * s + k.a_e * e;
  if (k.has_clip) x = fminf(fmaxf(x, -k.clip), k.clip);
  x0 = x;
  prev = k.c0 * x + k.c1 * s + k.c2 * e + k.noise_scale * n;
}

// VEC elements per thread per iteration; VEC == 1 is the unaligned fallback. FROM_TABLE: the coefficients
// are table's row *table.index (k supplies has_clip / clip only); an index outside [0, rows) writes NaN to
// every output element (the glue cannot check it without a device sync), and a row noise_scale of 0 drops
// the noise term.
template <typename T, int VEC, bool FROM_TABLE>
__global__ void scheduler_step_kernel(const T* __restrict__ eps, const T* __restrict__ sample,
                                      const T* __restrict__ noise, T* __restrict__ prev, T* __restrict__ x0,
                                      int64_t n_vec, StepCoefs k, StepTable table) {
  using V = Vec<T, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (FROM_TABLE) {
    const int64_t row = *table.index;
    if (row < 0 || row >= table.rows) {
      V nan;
#pragma unroll
      for (int j = 0; j < VEC; ++j) nan.v[j] = from_float<T>(__int_as_float(0x7fc00000));
      for (int64_t i = first; i < n_vec; i += stride) {
        reinterpret_cast<V*>(prev)[i] = nan;
        reinterpret_cast<V*>(x0)[i] = nan;
      }
      return;
    }
    const float* r = table.coefs + row * table.s0;
    k.a_x = r[kTabAx * table.s1];
    k.a_e = r[kTabAe * table.s1];
    k.c0 = r[kTabC0 * table.s1];
    k.c1 = r[kTabC1 * table.s1];
    k.c2 = r[kTabC2 * table.s1];
    k.noise_scale = r[kTabNoiseScale * table.s1];
    if (k.noise_scale == 0.f) noise = nullptr;
  }
  for (int64_t i = first; i < n_vec; i += stride) {
    const V ev = reinterpret_cast<const V*>(eps)[i];
    const V sv = reinterpret_cast<const V*>(sample)[i];
    V nv;
    if (noise != nullptr) nv = reinterpret_cast<const V*>(noise)[i];
    V pv, xv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float nf = noise != nullptr ? to_float(nv.v[j]) : 0.f;
      float p, x;
      step_one(to_float(ev.v[j]), to_float(sv.v[j]), nf, k, p, x);
      pv.v[j] = from_float<T>(p);
      xv.v[j] = from_float<T>(x);
    }
    reinterpret_cast<V*>(prev)[i] = pv;
    reinterpret_cast<V*>(x0)[i] = xv;
  }
}

template <typename T, bool FROM_TABLE>
void launch_scheduler_step_impl(const T* eps, const T* sample, const T* noise, T* prev, T* x0, int64_t n,
                                const StepCoefs& k, const StepTable& table, int sm_count, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kThreads = 256;
  const bool vec_ok = is_aligned(eps, 16) && is_aligned(sample, 16) && is_aligned(prev, 16) &&
                      is_aligned(x0, 16) && (noise == nullptr || is_aligned(noise, 16));
  const int64_t max_blocks = static_cast<int64_t>(sm_count > 0 ? sm_count : 80) * 8;
  const int64_t n_vec = vec_ok ? n / kVec : 0;
  if (n_vec > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n_vec, kThreads), max_blocks));
    scheduler_step_kernel<T, kVec, FROM_TABLE><<<blocks, kThreads, 0, stream>>>(eps, sample, noise, prev, x0, n_vec,
                                                                                k, table);
  }
  // Scalar tail (or everything when the pointers are not 16-byte aligned).
  const int64_t done = n_vec * kVec;
  const int64_t rest = n - done;
  if (rest > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(rest, kThreads), max_blocks));
    scheduler_step_kernel<T, 1, FROM_TABLE><<<blocks, kThreads, 0, stream>>>(
        eps + done, sample + done, noise == nullptr ? nullptr : noise + done, prev + done, x0 + done, rest, k, table);
  }
}

// Host launcher. n: element count; table: nullptr for coefficients by value (k), else the device table;
// sm_count: multiprocessors (caps the grid of the grid-stride loop).
template <typename T>
void launch_scheduler_step(const T* eps, const T* sample, const T* noise, T* prev, T* x0, int64_t n,
                           const StepCoefs& k, const StepTable* table, int sm_count, cudaStream_t stream) {
  if (n == 0) return;
  if (table != nullptr) launch_scheduler_step_impl<T, true>(eps, sample, noise, prev, x0, n, k, *table, sm_count, stream);
  else launch_scheduler_step_impl<T, false>(eps, sample, noise, prev, x0, n, k, StepTable{}, sm_count, stream);
}

}  // namespace cuda
}  // namespace ddpm_fast
