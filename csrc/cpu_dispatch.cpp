// What the CPU kernels share (declared in cpu_dispatch.h), and the ops that describe the build:
//
//   cpu_kernels_isa() -> str           the instruction set of the inner loops this process uses
//                                      ("base", "avx2" or "avx512")
//   cpu_parallel_threads(int n) -> int how many threads an at::parallel_for of this module runs on
//
// The inner loops live in cpu_simd_*.cpp, built for the portable baseline, AVX2 and AVX-512; the best
// one the CPU runs is picked at every kernel call (OMNISIFT_CPU_ISA=base|avx2|avx512 caps it, for
// tests; OMNISIFT_CPU_BASELINE=1 is the same as base).
#include "cpu_dispatch.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "cpu_settings.h"

namespace omnisift {

const simd::Loops& cpu_loops() {
  std::string bad;
  const int cap = cpu_isa_cap(&bad);  // 0 base, 1 avx2, 2 avx512
  TORCH_CHECK_VALUE(cap >= 0, "omnisift: OMNISIFT_CPU_ISA must be base, avx2 or avx512, got '", bad, "'");
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
                                 __builtin_cpu_supports("f16c");
  static const bool has_avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (cap >= 2 && has_avx512 && simd::loops_avx512()) return *simd::loops_avx512();
  if (cap >= 1 && has_avx2 && simd::loops_avx2()) return *simd::loops_avx2();
#endif
  return *simd::loops_base();
}

simd::Elem elem_of(c10::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return simd::Elem::F32;
    case at::kBFloat16:
      return simd::Elem::BF16;
    case at::kHalf:
      return simd::Elem::F16;
    default:
      TORCH_CHECK_TYPE(false, "omnisift: no CPU inner loop for dtype ", t);
  }
}

void first_k_ranked(const float* sc, int64_t n, int64_t k, std::vector<int64_t>& order) {
  if (k <= 0) return;
  order.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  auto higher = [sc](int64_t i, int64_t j) {  // ranks i before j
    const float u = sc[i], v = sc[j];
    const bool un = std::isnan(u), vn = std::isnan(v);
    if (un != vn) return un;
    if (!un && u != v) return u > v;
    return i < j;
  };
  // nth_element puts the k-th ranked at k-1 and every better-ranked position before it.
  if (k < n) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), higher);
}

namespace {

std::string cpu_kernels_isa() { return cpu_loops().isa; }

// A build check: without the compiler's OpenMP flag the region would silently run on one thread.
int64_t cpu_parallel_threads(int64_t n) {
  std::atomic<int64_t> ranges{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { ranges.fetch_add(1); });
  return ranges.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnisift, m) {
  m.def("cpu_kernels_isa() -> str", &cpu_kernels_isa);
  m.def("cpu_parallel_threads(int n) -> int", &cpu_parallel_threads);
}

}  // namespace omnisift
