// Templates of the CPU inner loops over a vector policy V (see cpu_simd.h). Included by exactly one
// TU per instruction set. Everything here sits in an anonymous namespace (internal linkage) and
// calls no std:: template, so no function compiled with one TU's -m flags can be picked by the
// linker for another TU (an AVX-512 copy of std::fill serving the portable build, say).
//
// Each TU is compiled with its own -m flags (CMakeLists.txt), so no target attributes are needed.
// A policy provides: W (fp32 lanes), reg, load<E>(ptr) (W elements of type E as fp32), and the fp64
// half-width registers: dreg, lo(reg)/hi(reg) (the low/high W/2 lanes widened), dzero(),
// dload/dstore, dfma(a, b, c) = a*b + c, dadd(a, b), dhsum(dreg).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_simd.h"

namespace omnisift {
namespace simd {
namespace {

template <Elem E>
struct ElemType;
template <>
struct ElemType<Elem::F32> {
  using type = float;
};
template <>
struct ElemType<Elem::BF16> {
  using type = uint16_t;
};
template <>
struct ElemType<Elem::F16> {
  using type = uint16_t;
};

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // Inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value = man * 2^-24, exact in fp32
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    memcpy(&bits, &v, sizeof v);
    bits |= sign;
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

template <Elem E>
inline float to_f32(const typename ElemType<E>::type v) {
  if constexpr (E == Elem::F32) {
    return v;
  } else if constexpr (E == Elem::BF16) {
    return bf16_to_float(v);
  } else {
    return half_to_float(v);
  }
}

// ------------------------------------------------------------------------------------------------
// Row primitives. a, b: rows of element type E (contiguous); S, m: fp64 rows. Elements are widened to
// fp64 and every sum (the segment's sum, dots, squared norms) is accumulated in fp64 lanes, then the
// lanes are added: the cosines come out within an ulp or so of the exact value, so near ties are
// ranked as the exact scores rank them (an fp32 running sum over a frame's ~300 rows can be off by
// several ulps, enough to swap two tokens 4e-8 apart that the fp32 reference ranks correctly).
// The loops stay memory-bound: widening costs compute the memory stream leaves idle.

// Prefetch hint for the next rows: 2 = prefetcht1 (into L2). The next two rows (2 x 14 KB at D=3584
// fp32) do not fit beside the current two in a 32-48 KB L1; L2 holds them. Prefetching into L1
// (prefetcht0) would evict the current rows: slower for fp32, no faster for bf16.
constexpr int PrefetchLocality = 2;

// S += a (AddS), and the sums <a, b>, |a|^2, |b|^2 (HasB) or |a|^2 (no b) into r[0..2].
template <class V, Elem E, bool HasB, bool AddS = true>
inline void pass1(const typename ElemType<E>::type* a, const typename ElemType<E>::type* b, double* S, int64_t D,
                  double* r, const void* next_a, const void* next_b) {
  using dreg = typename V::dreg;
  constexpr int W = V::W, H = V::W / 2;
  dreg d0 = V::dzero(), d1 = V::dzero(), a0 = V::dzero(), a1 = V::dzero(), b0 = V::dzero(), b1 = V::dzero();
  int64_t d = 0;
  const char* pa = static_cast<const char*>(next_a);
  const char* pb = static_cast<const char*>(next_b);
  constexpr int64_t kStep = W * static_cast<int64_t>(sizeof(typename ElemType<E>::type));
  for (; d + W <= D; d += W) {
    // The next rows, one cache line per step ahead of their use (the rows are too short a stream
    // for the hardware prefetcher to ramp up on its own).
    if (pa) __builtin_prefetch(pa + d / W * kStep, 0, PrefetchLocality);
    if (HasB && pb) __builtin_prefetch(pb + d / W * kStep, 0, PrefetchLocality);
    const auto x = V::template load<E>(a + d);
    const dreg xl = V::lo(x), xh = V::hi(x);
    if constexpr (AddS) {
      V::dstore(S + d, V::dadd(V::dload(S + d), xl));
      V::dstore(S + d + H, V::dadd(V::dload(S + d + H), xh));
    }
    a0 = V::dfma(xl, xl, a0);
    a1 = V::dfma(xh, xh, a1);
    if constexpr (HasB) {
      const auto y = V::template load<E>(b + d);
      const dreg yl = V::lo(y), yh = V::hi(y);
      d0 = V::dfma(xl, yl, d0);
      d1 = V::dfma(xh, yh, d1);
      b0 = V::dfma(yl, yl, b0);
      b1 = V::dfma(yh, yh, b1);
    }
  }
  double dot = 0, na2 = 0, nb2 = 0;
  for (; d < D; ++d) {
    const double x = to_f32<E>(a[d]);
    if constexpr (AddS) S[d] += x;
    na2 += x * x;
    if constexpr (HasB) {
      const double y = to_f32<E>(b[d]);
      dot += x * y;
      nb2 += y * y;
    }
  }
  r[0] = dot + V::dhsum(V::dadd(d0, d1));
  r[1] = na2 + V::dhsum(V::dadd(a0, a1));
  r[2] = nb2 + V::dhsum(V::dadd(b0, b1));
}

// <a, m> with m fp64.
template <class V, Elem E>
inline double dot_f64(const typename ElemType<E>::type* a, const double* m, int64_t D) {
  using dreg = typename V::dreg;
  constexpr int W = V::W, H = V::W / 2;
  dreg d0 = V::dzero(), d1 = V::dzero();
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const auto x = V::template load<E>(a + d);
    d0 = V::dfma(V::lo(x), V::dload(m + d), d0);
    d1 = V::dfma(V::hi(x), V::dload(m + d + H), d1);
  }
  double dot = 0;
  for (; d < D; ++d) dot += static_cast<double>(to_f32<E>(a[d])) * m[d];
  return dot + V::dhsum(V::dadd(d0, d1));
}

// cos = dot / (max(|a|, eps) * max(|b|, eps)), as F.cosine_similarity (eps = 1e-8), in fp64.
inline float cosine(double dot, double na2, double nb2) {
  constexpr double eps = 1e-8;
  const double na = sqrt(na2), nb = sqrt(nb2);
  return static_cast<float>(dot / ((na > eps ? na : eps) * (nb > eps ? nb : eps)));
}

// ------------------------------------------------------------------------------------------------
// Finiteness: an element is NaN or +-Inf exactly when its exponent bits are all ones. Plain loops
// (the compiler vectorizes them with this TU's instruction set), blocks of 8192 with an early exit.

template <typename W, W kMask>
bool exponent_never_all_ones(const W* w, int64_t n) {
  constexpr int64_t kBlock = 8192;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = n < b + kBlock ? n : b + kBlock;
    W bad = 0;
    for (int64_t i = b; i < e; ++i) bad |= static_cast<W>((w[i] & kMask) == kMask);
    if (bad) return false;
  }
  return true;
}

template <typename W, W kMask>
bool exponent_never_all_ones_strided(const W* w, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    if ((w[i * stride] & kMask) == kMask) return false;
  }
  return true;
}

inline bool all_finite_strided_impl(const void* x, Elem elem, int64_t n, int64_t stride) {
  switch (elem) {
    case Elem::F32:
      return exponent_never_all_ones_strided<uint32_t, 0x7f800000u>(static_cast<const uint32_t*>(x), n, stride);
    case Elem::BF16:
      return exponent_never_all_ones_strided<uint16_t, 0x7f80u>(static_cast<const uint16_t*>(x), n, stride);
    case Elem::F16:
      return exponent_never_all_ones_strided<uint16_t, 0x7c00u>(static_cast<const uint16_t*>(x), n, stride);
  }
  return true;
}

inline bool all_finite_impl(const void* x, Elem elem, int64_t n) {
  switch (elem) {
    case Elem::F32:
      return exponent_never_all_ones<uint32_t, 0x7f800000u>(static_cast<const uint32_t*>(x), n);
    case Elem::BF16:
      return exponent_never_all_ones<uint16_t, 0x7f80u>(static_cast<const uint16_t*>(x), n);
    case Elem::F16:
      return exponent_never_all_ones<uint16_t, 0x7c00u>(static_cast<const uint16_t*>(x), n);
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// The unit schedule: pass 1 reads the unit's rows from memory (A's sum and norms, a fused B's temporal
// dots, both frames side by side), pass 2 reads A again for the dots with the mean, mostly from the
// L2/L3 cache. (Column blocks of D sized for L2, which would read every byte from memory exactly once,
// are slower: their short strided runs defeat the hardware prefetcher.)
// Strided rows (stride_d != 1) are converted into the fp32 scratch rows first. Without saliency tokens
// (only pairs) a unit has no pass 1.

// One unit's work, split in two passes over position ranges, so that a caller can run a unit's
// positions on several threads (few units) or whole units per thread (many units).
template <class V, Elem E, bool Strided>
struct UnitKernel {
  using T = typename ElemType<E>::type;
  static constexpr Elem RE = Strided ? Elem::F32 : E;  // element type the primitives see
  using RT = typename ElemType<RE>::type;

  const VideoScoresProblem& p;
  const T* x;
  int64_t a0 = 0, b0 = 0, n = 0;
  bool fused = false, needs_mean = false;

  UnitKernel(const VideoScoresProblem& prob, int64_t u) : p(prob), x(static_cast<const T*>(prob.x)) {
    const int64_t seg = p.unit_seg[u];
    a0 = p.seg_offsets[seg];
    n = p.seg_offsets[seg + 1] - a0;
    fused = p.unit_fused[u] != 0;
    b0 = fused ? p.seg_offsets[seg + 1] : 0;
    needs_mean = p.unit_needs_mean[u] != 0;
  }
  const void* raw_row(int64_t t) const {
    const int64_t b = t / p.L;
    return x + b * p.stride_b + (t - b * p.L) * p.stride_l;
  }
  // The row of flat token t (converted into buf when strided).
  const RT* row(int64_t t, float* buf) const {
    const T* r = static_cast<const T*>(raw_row(t));
    if constexpr (Strided) {
      for (int64_t d = 0; d < p.D; ++d) buf[d] = to_f32<E>(r[d * p.stride_d]);
      return buf;
    } else {
      (void)buf;
      return reinterpret_cast<const RT*>(r);
    }
  }
  // NaN/Inf in a row makes its squared norm non-finite (and so may a finite row with huge values:
  // only then are the row's elements checked one by one).
  void flag_if_nonfinite(int64_t t, double norm2) const {
    if (!p.check_finite || __builtin_isfinite(norm2)) return;
    if (!all_finite_strided_impl(raw_row(t), E, p.D, p.stride_d)) {
      __atomic_store_n(p.nonfinite_token, t, __ATOMIC_RELAXED);
    }
  }
  // Pass 1 over positions [i0, i1) (needs_mean only): S += A rows; |a_i|^2 and a fused B's <a_i, b_i>,
  // |b_i|^2 into acc (norm_a, dot_ab, norm_b: three arrays of n). A and B are read side by side.
  void pass1_range(int64_t i0, int64_t i1, double* S, double* acc, float* row_a, float* row_b) const {
    double* norm_a = acc;
    double* dot_ab = acc + n;
    double* norm_b = acc + 2 * n;
    const int64_t* tok = p.token_index;
    double r[3];
    for (int64_t i = i0; i < i1; ++i) {
      const RT* ra = row(tok[a0 + i], row_a);
      const void* next_a = !Strided && i + 1 < i1 ? raw_row(tok[a0 + i + 1]) : nullptr;
      if (fused) {
        const void* next_b = !Strided && i + 1 < i1 ? raw_row(tok[b0 + i + 1]) : nullptr;
        pass1<V, RE, true>(ra, row(tok[b0 + i], row_b), S, p.D, r, next_a, next_b);
        dot_ab[i] = r[0];
        norm_b[i] = r[2];
      } else {
        pass1<V, RE, false>(ra, nullptr, S, p.D, r, next_a, nullptr);
      }
      norm_a[i] = r[1];
    }
  }
  // Pass 2 over positions [i0, i1): every score of the range (mean: the segment's mean, mm = |mean|^2;
  // unused without needs_mean). A is read again, mostly from the cache.
  // Prefetches row i of the unit's frames (A, and B when fused) into L2 (from where they fall to L3):
  // pass 2 of the previous unit reads from the cache only, so it streams this unit in meanwhile.
  void prefetch_rows(int64_t i) const {
    if (Strided || i >= n) return;
    const int64_t bytes = p.D * static_cast<int64_t>(sizeof(T));
    const char* ra = static_cast<const char*>(raw_row(p.token_index[a0 + i]));
    const char* rb = fused ? static_cast<const char*>(raw_row(p.token_index[b0 + i])) : nullptr;
    for (int64_t o = 0; o < bytes; o += 64) {
      __builtin_prefetch(ra + o, 0, PrefetchLocality);
      if (rb) __builtin_prefetch(rb + o, 0, PrefetchLocality);
    }
  }
  void pass2_range(int64_t i0, int64_t i1, const double* mean, double mm, const double* acc, float* row_a,
                   float* row_b, const UnitKernel* next = nullptr) const {
    const double* norm_a = acc;
    const double* dot_ab = acc + n;
    const double* norm_b = acc + 2 * n;
    const int64_t* tok = p.token_index;
    const int64_t* pair = p.pair_index;
    double r[3];
    for (int64_t i = i0; i < i1; ++i) {
      if (next) next->prefetch_rows(i - i0);
      const int64_t t = tok[a0 + i];
      if (pair[a0 + i] < 0) {
        p.out[a0 + i] = cosine(dot_f64<V, RE>(row(t, row_a), mean, p.D), norm_a[i], mm);
        flag_if_nonfinite(t, norm_a[i]);
      } else {
        pass1<V, RE, true, false>(row(t, row_a), row(pair[a0 + i], row_b), nullptr, p.D, r, nullptr, nullptr);
        p.out[a0 + i] = cosine(r[0], r[1], r[2]);
        flag_if_nonfinite(t, r[1]);
      }
      if (fused) {
        p.out[b0 + i] = cosine(dot_ab[i], norm_a[i], norm_b[i]);
        flag_if_nonfinite(tok[b0 + i], norm_b[i]);
      }
    }
  }
};

// mean = S / n in place; returns |mean|^2.
inline double finish_mean(double* S, int64_t D, int64_t n) {
  const double inv = 1.0 / static_cast<double>(n);
  double mm = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    S[d] *= inv;
    mm += S[d] * S[d];
  }
  return mm;
}

template <class V, Elem E, bool Strided>
void video_units_impl(const VideoScoresProblem& p, int64_t u0, int64_t u1, VideoScoresScratch& s) {
  for (int64_t u = u0; u < u1; ++u) {
    const UnitKernel<V, E, Strided> k(p, u);
    if (k.n <= 0) continue;
    double mm = 0.0;
    if (k.needs_mean) {
      for (int64_t d = 0; d < p.D; ++d) s.sum[d] = 0.0;
      k.pass1_range(0, k.n, s.sum, s.acc, s.row_a, s.row_b);
      mm = finish_mean(s.sum, p.D, k.n);
    }
    if (u + 1 < u1) {
      const UnitKernel<V, E, Strided> next(p, u + 1);
      k.pass2_range(0, k.n, s.sum, mm, s.acc, s.row_a, s.row_b, &next);
    } else {
      k.pass2_range(0, k.n, s.sum, mm, s.acc, s.row_a, s.row_b);
    }
    // The unit's scores are final: let the caller use them while its rows are still in cache.
    if (p.after_unit) p.after_unit(p.after_unit_ctx, p.unit_seg[u], k.fused ? 2 : 1);
  }
}

// Dispatch on the element type and on unit strides.
template <template <class, Elem, bool> class F, class V, class... Args>
void dispatch_elem(const VideoScoresProblem& p, Args&&... args) {
  const bool strided = p.stride_d != 1;
  switch (p.elem) {
    case Elem::F32:
      strided ? F<V, Elem::F32, true>::run(p, args...) : F<V, Elem::F32, false>::run(p, args...);
      break;
    case Elem::BF16:
      strided ? F<V, Elem::BF16, true>::run(p, args...) : F<V, Elem::BF16, false>::run(p, args...);
      break;
    case Elem::F16:
      strided ? F<V, Elem::F16, true>::run(p, args...) : F<V, Elem::F16, false>::run(p, args...);
      break;
  }
}

template <class V, Elem E, bool Strided>
struct RunUnits {
  static void run(const VideoScoresProblem& p, int64_t u0, int64_t u1, VideoScoresScratch& s) {
    video_units_impl<V, E, Strided>(p, u0, u1, s);
  }
};
template <class V, Elem E, bool Strided>
struct RunPass1 {
  static void run(const VideoScoresProblem& p, int64_t u, int64_t i0, int64_t i1, double* S, double* acc,
                  float* row_a, float* row_b) {
    UnitKernel<V, E, Strided>(p, u).pass1_range(i0, i1, S, acc, row_a, row_b);
  }
};
template <class V, Elem E, bool Strided>
struct RunPass2 {
  static void run(const VideoScoresProblem& p, int64_t u, int64_t i0, int64_t i1, const double* mean, double mm,
                  const double* acc, float* row_a, float* row_b) {
    UnitKernel<V, E, Strided>(p, u).pass2_range(i0, i1, mean, mm, acc, row_a, row_b);
  }
};

template <class V>
void video_units(const VideoScoresProblem& p, int64_t u0, int64_t u1, VideoScoresScratch& s) {
  dispatch_elem<RunUnits, V>(p, u0, u1, s);
}
template <class V>
void unit_pass1(const VideoScoresProblem& p, int64_t u, int64_t i0, int64_t i1, double* S, double* acc,
                float* row_a, float* row_b) {
  dispatch_elem<RunPass1, V>(p, u, i0, i1, S, acc, row_a, row_b);
}
template <class V>
void unit_pass2(const VideoScoresProblem& p, int64_t u, int64_t i0, int64_t i1, const double* mean, double mm,
                const double* acc, float* row_a, float* row_b) {
  dispatch_elem<RunPass2, V>(p, u, i0, i1, mean, mm, acc, row_a, row_b);
}

}  // namespace
}  // namespace simd
}  // namespace omnisift
