// The AVX-512 build of the CPU inner loops (compiled with -mavx512f -mavx512bw -mavx512vl -mfma
// -mf16c; called only when the CPU has AVX-512F/BW/VL).
#include "cpu_simd_impl.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

namespace omnisift {
namespace simd {
namespace {

struct VecAvx512 {
  static constexpr int W = 16;
  using reg = __m512;
  template <Elem E>
  static reg load(const typename ElemType<E>::type* p) {
    if constexpr (E == Elem::F32) {
      return _mm512_loadu_ps(p);
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (E == Elem::BF16) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        return _mm512_cvtph_ps(h);
      }
    }
  }
  using dreg = __m512d;
  static dreg dzero() { return _mm512_setzero_pd(); }
  static dreg lo(reg a) { return _mm512_cvtps_pd(_mm512_castps512_ps256(a)); }
  static dreg hi(reg a) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  }
  static dreg dload(const double* p) { return _mm512_loadu_pd(p); }
  static void dstore(double* p, dreg a) { _mm512_storeu_pd(p, a); }
  static dreg dfma(dreg a, dreg b, dreg c) { return _mm512_fmadd_pd(a, b, c); }
  static dreg dadd(dreg a, dreg b) { return _mm512_add_pd(a, b); }
  static double dhsum(dreg v) { return _mm512_reduce_add_pd(v); }
};

const Loops kLoops = {"avx512", &video_units<VecAvx512>, &unit_pass1<VecAvx512>, &unit_pass2<VecAvx512>, &all_finite_impl,
                      &all_finite_strided_impl};

}  // namespace

const Loops* loops_avx512() { return &kLoops; }

}  // namespace simd
}  // namespace omnisift

#else

namespace omnisift {
namespace simd {
const Loops* loops_avx512() { return nullptr; }
}  // namespace simd
}  // namespace omnisift

#endif
