// The AVX2 + FMA + F16C build of the CPU inner loops (compiled with -mavx2 -mfma -mf16c; called only
// when the CPU has them).
#include "cpu_simd_impl.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace omnisift {
namespace simd {
namespace {

struct VecAvx2 {
  static constexpr int W = 8;
  using reg = __m256;
  template <Elem E>
  static reg load(const typename ElemType<E>::type* p) {
    if constexpr (E == Elem::F32) {
      return _mm256_loadu_ps(p);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if constexpr (E == Elem::BF16) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        return _mm256_cvtph_ps(h);
      }
    }
  }
  using dreg = __m256d;
  static dreg dzero() { return _mm256_setzero_pd(); }
  static dreg lo(reg a) { return _mm256_cvtps_pd(_mm256_castps256_ps128(a)); }
  static dreg hi(reg a) { return _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)); }
  static dreg dload(const double* p) { return _mm256_loadu_pd(p); }
  static void dstore(double* p, dreg a) { _mm256_storeu_pd(p, a); }
  static dreg dfma(dreg a, dreg b, dreg c) { return _mm256_fmadd_pd(a, b, c); }
  static dreg dadd(dreg a, dreg b) { return _mm256_add_pd(a, b); }
  static double dhsum(dreg v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
};

const Loops kLoops = {"avx2", &video_units<VecAvx2>, &unit_pass1<VecAvx2>, &unit_pass2<VecAvx2>, &all_finite_impl,
                      &all_finite_strided_impl, nullptr};

}  // namespace

const Loops* loops_avx2() { return &kLoops; }

}  // namespace simd
}  // namespace omnisift

#else

namespace omnisift {
namespace simd {
const Loops* loops_avx2() { return nullptr; }
}  // namespace simd
}  // namespace omnisift

#endif
