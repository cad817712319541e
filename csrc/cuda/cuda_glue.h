// Launch-error reporting for the CUDA glue, through checks.h's host-compiled `fail`.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "checks.h"

namespace ddpm_fast {

inline void check_launch(const char* op, cudaError_t err) {
  if (err != cudaSuccess) fail(std::string(op) + " (CUDA): kernel launch failed: " + cudaGetErrorString(err));
}

}  // namespace ddpm_fast
