// Helpers shared by the CPU op glue (dtype mapping, kernel table; argument checks come from checks.h).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace ddpm_fast::cpu {

inline DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "ddpm_fast: unsupported dtype ", t, " (expected float32, bfloat16 or float16)");
  }
}

}  // namespace ddpm_fast::cpu
