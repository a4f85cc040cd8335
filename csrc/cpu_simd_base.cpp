// The portable build of the CPU inner loops (any CPU): 8 fp32 lanes widened to 2 x 4 fp64 lanes in
// plain arrays, which the compiler maps onto the baseline vector registers (SSE2 on x86-64).
#include "cpu_simd_impl.h"

namespace omnisift {
namespace simd {
namespace {

struct VecBase {
  static constexpr int W = 8;
  struct reg {
    float v[W];
  };
  template <Elem E>
  static reg load(const typename ElemType<E>::type* p) {
    reg r;
    for (int j = 0; j < W; ++j) r.v[j] = to_f32<E>(p[j]);
    return r;
  }
  // fp64 halves of a reg.
  struct dreg {
    double v[W / 2];
  };
  static dreg dzero() {
    dreg r;
    for (int j = 0; j < W / 2; ++j) r.v[j] = 0.0;
    return r;
  }
  static dreg lo(reg a) {
    dreg r;
    for (int j = 0; j < W / 2; ++j) r.v[j] = a.v[j];
    return r;
  }
  static dreg hi(reg a) {
    dreg r;
    for (int j = 0; j < W / 2; ++j) r.v[j] = a.v[W / 2 + j];
    return r;
  }
  static dreg dload(const double* p) {
    dreg r;
    for (int j = 0; j < W / 2; ++j) r.v[j] = p[j];
    return r;
  }
  static void dstore(double* p, dreg a) {
    for (int j = 0; j < W / 2; ++j) p[j] = a.v[j];
  }
  static dreg dfma(dreg a, dreg b, dreg c) {
    for (int j = 0; j < W / 2; ++j) c.v[j] += a.v[j] * b.v[j];
    return c;
  }
  static dreg dadd(dreg a, dreg b) {
    for (int j = 0; j < W / 2; ++j) a.v[j] += b.v[j];
    return a;
  }
  static double dhsum(dreg a) {
    double s = 0.0;
    for (int j = 0; j < W / 2; ++j) s += a.v[j];
    return s;
  }
};

const Loops kLoops = {"base", &video_units<VecBase>, &unit_pass1<VecBase>, &unit_pass2<VecBase>, &all_finite_impl,
                      &all_finite_strided_impl, nullptr};

}  // namespace

const Loops* loops_base() { return &kLoops; }

}  // namespace simd
}  // namespace omnisift
