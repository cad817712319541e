// Helpers shared by the CPU op glue (csrc/cpu/*.cpp): torch through the stable ABI (stable_compat.h), the
// argument checks (checks.h) and the per-ISA kernel table (kernels.h).
#pragma once

#include <algorithm>
#include <cstdlib>

#include "checks.h"
#include "cpu/kernels.h"
#include "stable_compat.h"

namespace ddpm_fast::cpu {

inline int64_t num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

// torch::stable::parallel_for (torch's thread pool). DDPM_FAST_SERIAL_CHUNKS=1, for tests, instead runs the
// chunks it would hand to the threads one after another on the calling thread, which torch_parallel_for
// is free to do as well: no chunk may wait for another to start (tests/test_ops.py checks group_norm_silu).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  static const bool serial = [] {
    const char* v = std::getenv("DDPM_FAST_SERIAL_CHUNKS");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  if (!serial) return torch::stable::parallel_for(begin, end, grain, f);
  if (begin >= end) return;
  const int64_t n = end - begin, g = std::max<int64_t>(grain, 1);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(num_threads(), (n + g - 1) / g));
  const int64_t chunk = (n + tasks - 1) / tasks;
  for (int64_t b = begin; b < end; b += chunk) f(b, std::min(end, b + chunk));
}

}  // namespace ddpm_fast::cpu
