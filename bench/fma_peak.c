// Peak fp32 FMA throughput of this CPU (AVX2 + FMA, 256-bit), one and two threads: the hard ceiling for any
// GEMM or convolution. Ten independent accumulator chains cover the FMA latency on both FMA pipes.
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

int main(void) {
  const long iters = 200000000;  // FMA instructions per thread
  int max_threads = omp_get_max_threads();
  for (int nt = 1; nt <= max_threads; nt *= 2) {
    float sink = 0.f;
    const double t0 = now();
#pragma omp parallel num_threads(nt) reduction(+ : sink)
    {
      const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-6f);
      __m256 a[10];
      for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps((float)i);
      for (long it = 0; it < iters / 10; ++it)
        for (int i = 0; i < 10; ++i) a[i] = _mm256_fmadd_ps(a[i], x, y);
      __m256 s = a[0];
      for (int i = 1; i < 10; ++i) s = _mm256_add_ps(s, a[i]);
      float o[8];
      _mm256_storeu_ps(o, s);
      sink += o[0];  // keeps the chains alive
    }
    const double t = now() - t0;
    printf("threads %d: %.1f GFLOP/s fp32 FMA peak (checksum %g)\n", nt, nt * (double)iters * 16 / t / 1e9, sink);
  }
  return 0;
}
