// Raw-pointer CPU kernels, compiled once per instruction set (csrc/cpu/kernels/*.cpp, see CMakeLists.txt)
// and chosen at run time by ddpm_fast::cpu::kernels(). Only plain pointers cross this boundary so the
// ISA-specific objects include nothing but at::vec (keeps AVX2 code out of shared inline functions).
#pragma once
#include <cstdint>

namespace ddpm_fast::cpu {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct StepCoefs {
  float a_x, a_e, c0, c1, c2, noise_scale, clip;
  bool has_clip, has_noise;
};

// One (batch, head) pair of attention in fp32. q/k/v rows have unit stride along D.
struct AttnArgs {
  const float* q;   // [L, D], row stride q_rs
  const float* kt;  // packed K^T blocks: ceil(S/kBlock) blocks of [D, kBlock] (zero padded)
  const float* v;   // [S, Dv], row stride v_rs
  float* out;       // [L, Dv], row stride out_rs
  int64_t q_rs, v_rs, out_rs;
  int64_t L, S, D, Dv;
  float scale;
};
constexpr int64_t kAttnKBlock = 64;  // keys per block (multiple of 16: two 8-float vectors, zero padded)

struct Kernels {
  const char* isa;
  // scheduler step on n contiguous elements.
  void (*scheduler_step)(DType, const void* eps, const void* x, const void* noise, void* prev, void* x0,
                         int64_t n, const StepCoefs&);
  // Per-row mean (= shift + off) and M2 (sum of squared deviations, two-pass) of rows [r0, r1) of length len.
  void (*row_stats)(DType, const void* x, int64_t len, int64_t r0, int64_t r1, float* shift, float* off, float* m2);
  // Per-column mean and M2 over p rows of c columns (channels-last pixels x channels).
  void (*col_stats)(DType, const void* x, int64_t p, int64_t c, float* shift, float* off, float* m2);
  // y = (x - hi[r]) * a[r] + b[r] (then SiLU) for rows [r0, r1) of length len.
  void (*row_affine)(DType, const void* x, void* y, int64_t len, int64_t r0, int64_t r1, const float* hi,
                     const float* a, const float* b, bool silu);
  // y = (x - hi) * a + b per column (then SiLU) over p rows of c columns.
  void (*col_affine)(DType, const void* x, void* y, int64_t p, int64_t c, const float* hi, const float* a,
                     const float* b, bool silu);
  // Pack K [S, D] (row stride k_rs) into the blocked K^T layout of AttnArgs::kt.
  void (*attn_pack_kt)(const float* k, int64_t k_rs, int64_t S, int64_t D, float* kt);
  // Rows [q0, q1) of one attention problem; scratch holds attn_scratch_floats(...) floats.
  void (*attn_rows)(const AttnArgs&, int64_t q0, int64_t q1, float* scratch);
};

inline int64_t attn_scratch_floats(int64_t rows, int64_t Dv) {
  return rows * Dv + rows * kAttnKBlock + 2 * rows + 64;
}

#define DDPM_FAST_DECLARE_ISA(NS) \
  namespace NS {                  \
  const Kernels& table();         \
  }
DDPM_FAST_DECLARE_ISA(DEFAULT)
DDPM_FAST_DECLARE_ISA(AVX2)
#undef DDPM_FAST_DECLARE_ISA

// The best table this CPU supports (DDPM_FAST_CPU_ISA=default|avx2 forces one, for testing).
const Kernels& kernels();

}  // namespace ddpm_fast::cpu
