// Small device helpers shared by the ddpm_fast CUDA kernels. CUDA headers only (no torch), so the kernel
// headers stay compilable with nvcc alone.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernel_types.h"  // DType, StepCoefs: shared with the CPU kernels

namespace ddpm_fast {
namespace cuda {

// Explicit conversions: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ (and the bf16 twin),
// so implicit float <-> half casts do not exist there.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Fixed-size vector of N elements loaded/stored as one aligned access (N * sizeof(T) <= 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Run-time element type of small side inputs (weight, bias, temb) that may differ from the main tensor's
// (ddpm_fast::DType, mapped by the glue with kernel_dtype(), which raises for any other dtype).
using ddpm_fast::DType;

__device__ __forceinline__ float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  return __int_as_float(0x7fc00000);  // unreachable: NaN rather than a guess
}

inline bool is_aligned(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Cached integer device attribute (multiprocessor count, shared-memory limits, compute capability). A query is
// not a stream operation, so it is safe during graph capture; on failure the error is cleared and `fallback`
// returned. Other attributes are queried each time.
inline int device_attribute(cudaDeviceAttr attr, int device, int fallback) {
  constexpr int kMaxDevices = 64;
  constexpr cudaDeviceAttr kCached[] = {cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                        cudaDevAttrComputeCapabilityMajor};
  constexpr int kSlots = sizeof(kCached) / sizeof(kCached[0]);
  static std::atomic<int> cache[kSlots][kMaxDevices] = {};
  int slot = -1;
  for (int i = 0; i < kSlots; ++i)
    if (attr == kCached[i]) slot = i;
  const bool cacheable = slot >= 0 && device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int v = cache[slot][device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, attr, device) != cudaSuccess || v <= 0) {
    (void)cudaGetLastError();
    return fallback;
  }
  if (cacheable) cache[slot][device].store(v, std::memory_order_relaxed);
  return v;
}

}  // namespace cuda
}  // namespace ddpm_fast
