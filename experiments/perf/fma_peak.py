"""The machine's FP32 peak: a register-resident loop of independent fused multiply-adds on the
widest vectors `lscpu` reports (AVX-512 or AVX2), one thread per core, compiled with the system's C
compiler. The figure `frac_of_peak` divides by (`--cpu_peak_gflops` of the benchmark).

    python experiments/perf/fma_peak.py          # {"isa": "avx512f", "threads": 2, "gflops": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

# 12 independent accumulators hide the FMA latency (4 cycles) on two FMA ports; 2 flops per lane.
SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(__AVX512F__)
typedef __m512 V;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define LANES 16
static float sum(V v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 V;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#define LANES 8
static float sum(V v) {
  float f[8], s = 0;
  _mm256_storeu_ps(f, v);
  for (int i = 0; i < 8; i++) s += f[i];
  return s;
}
#endif
#define N 12
int main(int argc, char **argv) {
  long iters = atol(argv[1]);
  double t0 = omp_get_wtime();
  float total = 0;
#pragma omp parallel reduction(+ : total)
  {
    V acc[N], a = SET1(0.999999f), b = SET1(1e-7f);
    for (int j = 0; j < N; j++) acc[j] = SET1((float)j);
    for (long i = 0; i < iters; i++)
      for (int j = 0; j < N; j++) acc[j] = FMA(acc[j], a, b);
    V s = acc[0];
    for (int j = 1; j < N; j++) s = ADD(s, acc[j]);
    total += sum(s);
  }
  double dt = omp_get_wtime() - t0;
  int threads = omp_get_max_threads();
  printf("%d %.6f %.1f %f\n", threads, dt, 2.0 * LANES * N * iters * threads / dt / 1e9, total);
  return 0;
}
"""


def _isa() -> str:
    flags = open("/proc/cpuinfo").read()
    return "avx512f" if " avx512f" in flags else "avx2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200_000_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    isa = _isa()
    march = ["-mavx512f", "-mfma"] if isa == "avx512f" else ["-mavx2", "-mfma"]
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "fma.c"), os.path.join(tmp, "fma")
        with open(src, "w") as f:
            f.write(SOURCE)
        subprocess.run(
            ["cc", "-O3", "-funroll-loops", "-fopenmp", *march, src, "-o", exe], check=True
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [exe, str(args.iters)], env=env, capture_output=True, text=True, check=True
            )
            threads, seconds, gflops, _ = out.stdout.split()
            runs.append(float(gflops))
    print(json.dumps({"isa": isa, "threads": int(threads), "gflops": max(runs), "all": runs}))


if __name__ == "__main__":
    main()
