// Helpers shared by the CPU op glue (csrc/cpu/*.cpp): torch through the stable ABI (stable_compat.h), the
// argument checks (checks.h) and the per-ISA kernel table (kernels.h).
#pragma once

#include "checks.h"
#include "cpu/kernels.h"
#include "stable_compat.h"

namespace ddpm_fast::cpu {

using torch::stable::parallel_for;

inline int64_t num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

}  // namespace ddpm_fast::cpu
