// Peak fp32 FMA throughput of this CPU, one and two threads, with 256-bit (AVX2 + FMA) and, where the CPU has it,
// 512-bit (AVX-512 F) vectors: the hard ceiling for any GEMM or convolution of that vector width. Ten independent
// accumulator chains per thread cover the FMA latency on both FMA pipes.
//
//   gcc -O3 -mavx2 -mfma -fopenmp bench/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static const long kIters = 200000000;  // FMA instructions per thread

static float chains256(void) {
  const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-6f);
  __m256 a[10];
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps((float)i);
  for (long it = 0; it < kIters / 10; ++it)
    for (int i = 0; i < 10; ++i) a[i] = _mm256_fmadd_ps(a[i], x, y);
  __m256 s = a[0];
  for (int i = 1; i < 10; ++i) s = _mm256_add_ps(s, a[i]);
  float o[8];
  _mm256_storeu_ps(o, s);
  return o[0];  // keeps the chains alive
}

__attribute__((target("avx512f"))) static float chains512(void) {
  const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-6f);
  __m512 a[10];
  for (int i = 0; i < 10; ++i) a[i] = _mm512_set1_ps((float)i);
  for (long it = 0; it < kIters / 10; ++it)
    for (int i = 0; i < 10; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
  __m512 s = a[0];
  for (int i = 1; i < 10; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

int main(void) {
  const int max_threads = omp_get_max_threads();
  const int wide = __builtin_cpu_supports("avx512f");
  for (int bits = 256; bits <= (wide ? 512 : 256); bits *= 2) {
    for (int nt = 1; nt <= max_threads; nt *= 2) {
      float sink = 0.f;
      const double t0 = now();
#pragma omp parallel num_threads(nt) reduction(+ : sink)
      sink += bits == 512 ? chains512() : chains256();
      const double t = now() - t0;
      printf("threads %d: %.1f GFLOP/s fp32 FMA peak, %d-bit vectors (checksum %g)\n", nt,
             nt * (double)kIters * (bits / 16) / t / 1e9, bits, sink);
    }
  }
  if (!wide) printf("(no AVX-512 on this CPU)\n");
  return 0;
}
