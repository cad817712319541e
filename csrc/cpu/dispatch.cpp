// Picks the kernel table for the running CPU once: AVX2+FMA objects when the CPU has them, else the
// baseline build. DDPM_FAST_CPU_ISA=default|avx2 forces one (tests use it to cover both).
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
  DDPM_FAST_CHECK(want.empty() || want == "auto", "DDPM_FAST_CPU_ISA must be auto, default or avx2, got '", want,
                  "'");
#ifndef DDPM_FAST_NO_AVX2
  if (cpu_has_avx2()) return AVX2::table();
#endif
  return DEFAULT::table();
}

const Kernels& kernels() {
  static const Kernels& k = select();
  return k;
}

}  // namespace ddpm_fast::cpu
