// Types shared by the CPU kernels (csrc/cpu/kernels/), the CUDA kernels (csrc/cuda/*.cuh) and their glue.
// Plain C++ only (no torch, no CUDA header), so the per-ISA CPU kernel objects and nvcc's device code can
// both include it.
#pragma once

#include <cstdint>

namespace ddpm_fast {

// Element type of a tensor handed to a kernel. The glue maps a torch dtype with kernel_dtype() (checks.h),
// which raises for any other dtype: no kernel guesses.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// One scheduler step, elementwise and in fp32 (scheduler_step, scheduler_step_table):
//   x0   = a_x * sample + a_e * model_output, clamped to [-clip, clip] when has_clip
//   prev = c0 * x0 + c1 * sample + c2 * model_output (+ noise_scale * noise when has_noise)
struct StepCoefs {
  float a_x, a_e, c0, c1, c2, noise_scale, clip;
  bool has_clip, has_noise;
};

// Columns of scheduler_step_table's coefficient table, in this order.
enum StepTableColumn : int { kTabAx = 0, kTabAe, kTabC0, kTabC1, kTabC2, kTabNoiseScale, kStepTableCols };

}  // namespace ddpm_fast
