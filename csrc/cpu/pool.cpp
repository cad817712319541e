// The CPU kernels' memory pool. torch's CPU allocator hands large blocks to malloc, and glibc gives blocks above
// its mmap threshold (at most 32 MiB) back to the system on free, and trims the top of its heap once more
// than twice that is free there. A UNet forward allocates and frees the same large activations every call, so
// without a pool each call faults every page of them in again (a 256-px forward faulted about a gigabyte;
// figures in bench/results/). Inference engines keep an arena for this; here the kernels keep theirs: blocks
// of 4 MiB and up, in size classes (eight per power of two), reused by the next request of the same class.
//
// The blocks back torch tensors through torch_from_blob with a deleter (a C shim of torch >= 2.11, looked up
// at run time so that the library still loads on 2.10, where outputs come from torch's allocator). Freed
// blocks stay cached up to a limit (DDPM_FAST_CPU_POOL_MB, default a quarter of physical memory; 0 turns the
// pool off), beyond which they are freed; ddpm_fast.ops.empty_cpu_cache() frees every cached block.
#include "cpu/pool.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "checks.h"

namespace ddpm_fast::cpu {

namespace {

// torch_from_blob (torch/csrc/stable/c/shim.h, torch >= 2.11).
using FromBlobFn = AOTITorchError (*)(void* data, int64_t ndim, const int64_t* sizes, const int64_t* strides,
                                      int64_t storage_offset, int32_t dtype, int32_t device_type,
                                      int32_t device_index, AtenTensorHandle* ret, int32_t layout,
                                      const uint8_t* opaque_metadata, int64_t opaque_metadata_size,
                                      void (*deleter)(void* data, void* ctx), void* deleter_ctx);

FromBlobFn from_blob_fn() {
  static const FromBlobFn f = reinterpret_cast<FromBlobFn>(dlsym(RTLD_DEFAULT, "torch_from_blob"));
  return f;
}

int64_t default_limit() {
  if (const char* v = std::getenv("DDPM_FAST_CPU_POOL_MB")) {
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    DDPM_FAST_CHECK(end != v && *end == '\0' && mb >= 0, "DDPM_FAST_CPU_POOL_MB must be a whole number of MiB >= 0, got '",
                    v, "'");
    return int64_t(mb) << 20;
  }
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? int64_t(pages) * page / 4 : int64_t(1) << 30;
}

// Eight classes per power of two: at most 12.5 % of a block unused, and the repeated shapes of a forward map
// to the same classes.
int64_t class_bytes(int64_t bytes) {
  int shift = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes));
  const int64_t step = int64_t(1) << (shift - 3);
  return (bytes + step - 1) / step * step;
}

class Pool {
 public:
  Pool() : limit_(default_limit()) {
    // A fork (a DataLoader worker) copies the lock; take it around the fork so the child's copy is free.
    pthread_atfork([] { instance().mu_.lock(); }, [] { instance().mu_.unlock(); }, [] { instance().mu_.unlock(); });
  }

  static Pool& instance() {
    static Pool* p = new Pool();  // never destroyed: tensors may return blocks during interpreter exit
    return *p;
  }

  bool enabled() {
    std::lock_guard<std::mutex> g(mu_);
    return limit_ > 0;
  }

  // A block of class_bytes(bytes), or nullptr when the system has no memory left.
  void* acquire(int64_t block) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(block);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= block;
        live_ += block;
        ++hits_;
        return p;
      }
      ++misses_;
      live_ += block;
    }
    void* p = nullptr;
    const size_t align = 64;
    if (posix_memalign(&p, align, size_t(block)) != 0) {
      std::lock_guard<std::mutex> g(mu_);
      live_ -= block;
      return nullptr;
    }
#ifdef MADV_HUGEPAGE
    // Fewer faults on first use and fewer TLB misses after (a hint: THP may be off).
    if (align > 4096) madvise(p, size_t(block), MADV_HUGEPAGE);
#endif
    return p;
  }

  void release(void* p, int64_t block) {
    {
      std::lock_guard<std::mutex> g(mu_);
      live_ -= block;
      if (cached_ + block <= limit_) {
        free_[block].push_back(p);
        cached_ += block;
        return;
      }
    }
    std::free(p);
  }

  void release_cached() {
    std::vector<void*> all;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& [size, list] : free_) all.insert(all.end(), list.begin(), list.end());
      free_.clear();
      cached_ = 0;
    }
    for (void* p : all) std::free(p);
  }

  void set_limit(int64_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      limit_ = bytes;
    }
    if (cached() > bytes) release_cached();
  }

  int64_t cached() {
    std::lock_guard<std::mutex> g(mu_);
    return cached_;
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {cached_, live_, limit_, hits_, misses_};
  }

 private:
  std::mutex mu_;
  std::unordered_map<int64_t, std::vector<void*>> free_;
  int64_t limit_, cached_ = 0, live_ = 0, hits_ = 0, misses_ = 0;
};

// Bytes per element of the float dtypes the kernels write (0: not pooled).
int64_t float_element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return 4;
    case ScalarType::BFloat16:
    case ScalarType::Half: return 2;
    default: return 0;
  }
}

void release_block(void* data, void* ctx) {
  Pool::instance().release(data, static_cast<int64_t>(reinterpret_cast<intptr_t>(ctx)));
}

}  // namespace

Tensor pooled_strided(const Tensor& ref, IntHeaderOnlyArrayRef sizes, IntHeaderOnlyArrayRef strides,
                      std::optional<ScalarType> dtype) {
  const ScalarType dt = dtype.value_or(dtype_of(ref));
  int64_t extent = 1;  // elements from the first to one past the last
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) return alloc_strided(ref, sizes, strides, dtype);
    extent += (sizes[i] - 1) * strides[i];
  }
  const int64_t bytes = extent * float_element_size(dt);
  // A refusal (a torch whose shim wants other arguments) is not retried: it raises inside torch, which costs
  // more than the pool saves.
  static std::atomic<bool> refused{false};
  const FromBlobFn from_blob = from_blob_fn();
  if (bytes < kPoolMinBytes || from_blob == nullptr || refused.load(std::memory_order_relaxed) ||
      ref.device().type() != DeviceType::CPU || !Pool::instance().enabled())
    return alloc_strided(ref, sizes, strides, dtype);
  const int64_t block = class_bytes(bytes);
  void* p = Pool::instance().acquire(block);
  if (p == nullptr) return alloc_strided(ref, sizes, strides, dtype);  // torch's allocator reports the failure
  AtenTensorHandle out = nullptr;
  const AOTITorchError err =
      from_blob(p, static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), 0, shim_dtype(dt),
                aoti_torch_device_type_cpu(), -1, &out, aoti_torch_layout_strided(), nullptr, 0, release_block,
                reinterpret_cast<void*>(static_cast<intptr_t>(block)));
  if (err != AOTI_TORCH_SUCCESS) {
    refused.store(true, std::memory_order_relaxed);
    Pool::instance().release(p, block);
    return alloc_strided(ref, sizes, strides, dtype);
  }
  return Tensor(out);
}

Tensor pooled(const Tensor& ref, IntHeaderOnlyArrayRef sizes, MemoryFormat fmt, std::optional<ScalarType> dtype) {
  int64_t small[8];
  std::vector<int64_t> large(sizes.size() > 8 ? sizes.size() : 0);
  int64_t* st = sizes.size() > 8 ? large.data() : small;
  dense_strides(sizes, fmt, st);
  return pooled_strided(ref, sizes, IntHeaderOnlyArrayRef(st, sizes.size()), dtype);
}

PoolScratch::PoolScratch(int64_t bytes) : data_(nullptr), block_(0) {
  bytes = std::max<int64_t>(bytes, 64);
  if (bytes >= kPoolMinBytes && Pool::instance().enabled()) {
    block_ = class_bytes(bytes);
    data_ = Pool::instance().acquire(block_);
    if (data_ != nullptr) return;
    block_ = 0;
  }
  if (posix_memalign(&data_, 64, size_t(bytes)) != 0) data_ = nullptr;
  DDPM_FAST_CHECK(data_ != nullptr, "out of memory allocating ", bytes, " bytes of kernel scratch");
}

PoolScratch::~PoolScratch() {
  if (block_ > 0) Pool::instance().release(data_, block_);
  else std::free(data_);
}

PoolStats pool_stats() { return Pool::instance().stats(); }
void pool_release_cached() { Pool::instance().release_cached(); }
void pool_set_limit(int64_t bytes) { Pool::instance().set_limit(bytes); }

}  // namespace ddpm_fast::cpu
