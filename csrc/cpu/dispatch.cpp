// Picks the kernel table for the running CPU once: the AVX-512 objects when the CPU (and the OS, which
// __builtin_cpu_supports checks through XGETBV) has AVX-512 F/BW/DQ/VL, else the AVX2+FMA objects when it has
// those, else the baseline build. DDPM_FAST_CPU_ISA=default|avx2|avx512 forces one (the tests run each one
// the CPU supports); forcing one the CPU lacks is an error, not a silent fallback.
#include <cstdlib>
#include <cstring>
#include <string>

#include "checks.h"
#include "cpu/kernels.h"

namespace ddpm_fast::cpu {

static bool cpu_has_avx2() {
#if !defined(DDPM_FAST_NO_AVX2) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static bool cpu_has_avx512() {
#if !defined(DDPM_FAST_NO_AVX512) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

static const Kernels& select() {
  const char* env = std::getenv("DDPM_FAST_CPU_ISA");
  const std::string want = env ? env : "";
  if (want == "default" || want == "DEFAULT") return DEFAULT::table();
  if (want == "avx2" || want == "AVX2") {
    DDPM_FAST_CHECK(cpu_has_avx2(), "DDPM_FAST_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
#ifndef DDPM_FAST_NO_AVX2
    return AVX2::table();
#endif
  }
  if (want == "avx512" || want == "AVX512") {
    DDPM_FAST_CHECK(cpu_has_avx512(), "DDPM_FAST_CPU_ISA=avx512 but this CPU lacks AVX-512 F/BW/DQ/VL");
#ifndef DDPM_FAST_NO_AVX512
    return AVX512::table();
#endif
  }
  DDPM_FAST_CHECK(want.empty() || want == "auto", "DDPM_FAST_CPU_ISA must be auto, default, avx2 or avx512, got '",
                  want, "'");
#ifndef DDPM_FAST_NO_AVX512
  if (cpu_has_avx512()) return AVX512::table();
#endif
#ifndef DDPM_FAST_NO_AVX2
  if (cpu_has_avx2()) return AVX2::table();
#endif
  return DEFAULT::table();
}

const Kernels& kernels() {
  static const Kernels& k = select();
  return k;
}

// DDPM_FAST_TORCH_GEMM_AVX512=0|1 (read once; for tests) overrides the answer, so that both GEMM choices run on
// either vendor's CPU.
bool torch_gemm_avx512() {
  static const bool v = [] {
    const char* env = std::getenv("DDPM_FAST_TORCH_GEMM_AVX512");
    const std::string want = env ? env : "";
    DDPM_FAST_CHECK(want.empty() || want == "0" || want == "1", "DDPM_FAST_TORCH_GEMM_AVX512 must be 0 or 1, got '",
                    want, "'");
    if (!want.empty()) return want == "1";
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") && __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
  }();
  return v;
}

}  // namespace ddpm_fast::cpu
