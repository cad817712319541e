// Memory the CPU kernels keep between calls for their large outputs and scratch (see pool.cpp).
#pragma once

#include <cstdint>
#include <optional>

#include "stable_compat.h"

namespace ddpm_fast::cpu {

// Blocks below this size come from torch's allocator: glibc serves them from its heap without page faults, and
// at batch 1 (outputs and per-thread Winograd scratch of 0.5-1.5 MiB) the pool measured slower.
constexpr int64_t kPoolMinBytes = int64_t(4) << 20;

// A dense CPU tensor like alloc_strided(ref, sizes, strides, dtype) whose storage is a pooled block when it is
// large, the pool is on and this torch can give a tensor a deleter; otherwise alloc_strided's.
Tensor pooled_strided(const Tensor& ref, IntHeaderOnlyArrayRef sizes, IntHeaderOnlyArrayRef strides,
                      std::optional<ScalarType> dtype = std::nullopt);
// The same in memory format `fmt`.
Tensor pooled(const Tensor& ref, IntHeaderOnlyArrayRef sizes, MemoryFormat fmt = MemoryFormat::Contiguous,
              std::optional<ScalarType> dtype = std::nullopt);

// Scratch of at least `bytes`, 64-byte aligned, handed back to the pool when it goes out of scope.
class PoolScratch {
 public:
  explicit PoolScratch(int64_t bytes);
  ~PoolScratch();
  PoolScratch(const PoolScratch&) = delete;
  PoolScratch& operator=(const PoolScratch&) = delete;
  float* floats() const { return static_cast<float*>(data_); }

 private:
  void* data_;
  int64_t block_;  // the pooled block's size; 0 when data_ came from malloc
};

struct PoolStats {
  int64_t cached_bytes, live_bytes, limit_bytes, hits, misses;
};
PoolStats pool_stats();
// Frees every cached block (live ones return to the system when their tensors die).
void pool_release_cached();
// Cached (free) bytes kept at most; beyond it a returned block is freed. 0 turns the pool off.
void pool_set_limit(int64_t bytes);

}  // namespace ddpm_fast::cpu
