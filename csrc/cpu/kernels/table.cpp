// The function table for the instruction set this object is compiled for (CPU_CAPABILITY).
#include "cpu/kernels/common.h"

#define DDPM_FAST_STR2(x) #x
#define DDPM_FAST_STR(x) DDPM_FAST_STR2(x)

namespace ddpm_fast::cpu::CPU_CAPABILITY {
const Kernels& table() {
  static const Kernels t{DDPM_FAST_STR(CPU_CAPABILITY), scheduler_step_kernel, row_stats_kernel, col_stats_kernel,
                         row_affine_kernel, col_affine_kernel, softmax_rows_kernel,
                         winograd_input_kernel, DDPM_FAST_WINOGRAD_GEMM, winograd_output_kernel,
                         panel_gemm_kernel, DDPM_FAST_GEMM};
  return t;
}
}  // namespace ddpm_fast::cpu::CPU_CAPABILITY
