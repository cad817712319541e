// Warp-level tensor-core and async-copy primitives (sm_80+), as thin inline-PTX wrappers. CUDA headers only.
//
// Every PTX instruction the tensor-core attention (attention_mma_kernels.cuh) issues goes through this header,
// so that the kernel itself is plain C++ over these calls. csrc/cuda/emu/ compiles that kernel on the host with
// its own definitions of the same functions (DDPM_FAST_MMA_EMULATOR names the replacement header): a
// functional model of ldmatrix / mma.sync / cp.async, written from the PTX ISA's fragment tables, that runs the
// kernel's indexing, masking and synchronisation without a GPU.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", 16-bit types), lane = 4 * g + t
// (g = lane / 4, t = lane % 4); each 32-bit register holds two 16-bit elements, the lower column (or k) in the
// low half:
//   A (16 x 16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16 x 8, k x n):      b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C, D (16 x 8, fp32):    c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// ldmatrix.x4: lane 8 * i + r gives the shared address of row r of 8x8 matrix i; the lane gets register i =
// matrix i's (row g, columns 2t, 2t+1); with .trans it gets (rows 2t, 2t+1, column g) instead.
#pragma once

#if defined(DDPM_FAST_MMA_EMULATOR)
#include DDPM_FAST_MMA_EMULATOR
#else

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace ddpm_fast {
namespace cuda {
namespace mma {

// The kernels using these need sm_80 (cp.async, bf16 mma); on older targets the bodies compile to nothing and
// the glue never launches them there (it checks the device's compute capability).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define DDPM_FAST_MMA_ARCH_OK 1
#else
#define DDPM_FAST_MMA_ARCH_OK 0
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; `row` is this lane's row address (16-byte aligned, shared memory).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#if DDPM_FAST_MMA_ARCH_OK
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
#if DDPM_FAST_MMA_ARCH_OK
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#endif
}

// d += a * b, m16n8k16, fp32 accumulators, T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if DDPM_FAST_MMA_ARCH_OK
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#if DDPM_FAST_MMA_ARCH_OK
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats rounded to T and packed (lo in the low half), as one A-fragment register.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// 16 bytes global -> shared, asynchronously (L2 only). valid == false writes 16 zero bytes (src-size 0; src
// must still be a mapped address and is not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if DDPM_FAST_MMA_ARCH_OK
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_size)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if DDPM_FAST_MMA_ARCH_OK
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if DDPM_FAST_MMA_ARCH_OK
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The block's dynamic shared memory.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char ddpm_fast_mma_smem[];
  return ddpm_fast_mma_smem;
}

}  // namespace mma
}  // namespace cuda
}  // namespace ddpm_fast

#endif  // DDPM_FAST_MMA_EMULATOR
