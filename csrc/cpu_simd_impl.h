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
// ranked as the exact scores rank them (an fp32 running sum over a frame's ~300 rows was off by
// several ulps, enough to swap two tokens 4e-8 apart that the fp32 reference ranked correctly).
// The loops stay memory-bound: widening costs compute the memory stream leaves idle.

// S += a, and the sums <a, b>, |a|^2, |b|^2 (HasB) or |a|^2 (no b) into r[0..2].
template <class V, Elem E, bool HasB>
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
    if (pa) __builtin_prefetch(pa + d / W * kStep);
    if (HasB && pb) __builtin_prefetch(pb + d / W * kStep);
    const auto x = V::template load<E>(a + d);
    const dreg xl = V::lo(x), xh = V::hi(x);
    V::dstore(S + d, V::dadd(V::dload(S + d), xl));
    V::dstore(S + d + H, V::dadd(V::dload(S + d + H), xh));
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
    S[d] += x;
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

// <a, b>, |a|^2, |b|^2 into r[0..2].
template <class V, Elem E>
inline void dot3(const typename ElemType<E>::type* a, const typename ElemType<E>::type* b, int64_t D, double* r) {
  using dreg = typename V::dreg;
  constexpr int W = V::W;
  dreg d0 = V::dzero(), d1 = V::dzero(), a0 = V::dzero(), a1 = V::dzero(), b0 = V::dzero(), b1 = V::dzero();
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const auto x = V::template load<E>(a + d), y = V::template load<E>(b + d);
    const dreg xl = V::lo(x), xh = V::hi(x), yl = V::lo(y), yh = V::hi(y);
    d0 = V::dfma(xl, yl, d0);
    d1 = V::dfma(xh, yh, d1);
    a0 = V::dfma(xl, xl, a0);
    a1 = V::dfma(xh, xh, a1);
    b0 = V::dfma(yl, yl, b0);
    b1 = V::dfma(yh, yh, b1);
  }
  double dot = 0, na2 = 0, nb2 = 0;
  for (; d < D; ++d) {
    const double x = to_f32<E>(a[d]), y = to_f32<E>(b[d]);
    dot += x * y;
    na2 += x * x;
    nb2 += y * y;
  }
  r[0] = dot + V::dhsum(V::dadd(d0, d1));
  r[1] = na2 + V::dhsum(V::dadd(a0, a1));
  r[2] = nb2 + V::dhsum(V::dadd(b0, b1));
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
// L2/L3 cache. (Column blocks of D sized for L2, reading every byte from memory exactly once, measured
// slower: 4.7 vs 4.0 ms on omni7b-20s fp32, the short strided runs defeat the hardware prefetcher.)
// Strided rows (stride_d != 1) are converted into the fp32 scratch rows first.

template <class V, Elem E, bool Strided>
void video_units_impl(const VideoScoresProblem& p, int64_t u0, int64_t u1, VideoScoresScratch& s) {
  using T = typename ElemType<E>::type;
  constexpr Elem RE = Strided ? Elem::F32 : E;  // element type the primitives see
  using RT = typename ElemType<RE>::type;
  const T* x = static_cast<const T*>(p.x);
  const int64_t L = p.L, D = p.D;
  auto raw_row = [&](int64_t t) -> const void* {
    const int64_t b = t / L;
    return x + b * p.stride_b + (t - b * L) * p.stride_l;
  };
  // The row of flat token t (converted into buf when strided).
  auto row = [&](int64_t t, float* buf) -> const RT* {
    const int64_t b = t / L;
    const T* r = x + b * p.stride_b + (t - b * L) * p.stride_l;
    if constexpr (Strided) {
      for (int64_t d = 0; d < D; ++d) buf[d] = to_f32<E>(r[d * p.stride_d]);
      return buf;
    } else {
      (void)buf;
      return reinterpret_cast<const RT*>(r);
    }
  };
  const int64_t* tok = p.token_index;
  const int64_t* pair = p.pair_index;
  double* dot_am = s.acc;                       // <a_i, mean>
  double* norm_a = s.acc + p.max_segment;       // |a_i|^2
  double* dot_ab = s.acc + 2 * p.max_segment;   // <a_i, b_i> (fused)
  double* norm_b = s.acc + 3 * p.max_segment;   // |b_i|^2 (fused)
  // Every token's own squared norm is computed below; NaN/Inf in a row makes it non-finite (and so
  // may a finite row with huge values: only then are the row's elements checked one by one).
  auto flag_if_nonfinite = [&](int64_t t, double norm2) {
    if (!p.check_finite || __builtin_isfinite(norm2)) return;
    const int64_t b = t / L;
    if (!all_finite_strided_impl(x + b * p.stride_b + (t - b * L) * p.stride_l, E, D, p.stride_d)) {
      __atomic_store_n(p.nonfinite_token, t, __ATOMIC_RELAXED);
    }
  };
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t seg = p.unit_seg[u];
    const int64_t a0 = p.seg_offsets[seg], n = p.seg_offsets[seg + 1] - a0;
    if (n <= 0) continue;
    const bool fused = p.unit_fused[u] != 0;
    const int64_t b0 = fused ? p.seg_offsets[seg + 1] : 0;
    bool needs_mean = fused;
    for (int64_t i = 0; i < n && !needs_mean; ++i) needs_mean = pair[a0 + i] < 0;
    double r[3];
    if (needs_mean) {
      const double inv = 1.0 / static_cast<double>(n);
      double* S = s.sum;
      for (int64_t d = 0; d < D; ++d) S[d] = 0.0;
      // Pass 1: the sum and norms of A, a fused B's temporal dots (A and B read from memory).
      for (int64_t i = 0; i < n; ++i) {
        const RT* ra = row(tok[a0 + i], s.row_a);
        const void* next_a = !Strided && i + 1 < n ? raw_row(tok[a0 + i + 1]) : nullptr;
        const void* next_b = !Strided && fused && i + 1 < n ? raw_row(tok[b0 + i + 1]) : nullptr;
        if (fused) {
          pass1<V, RE, true>(ra, row(tok[b0 + i], s.row_b), S, D, r, next_a, next_b);
          dot_ab[i] = r[0];
          norm_b[i] = r[2];
        } else {
          pass1<V, RE, false>(ra, nullptr, S, D, r, next_a, nullptr);
        }
        norm_a[i] = r[1];
      }
      double mm = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        S[d] *= inv;  // the mean
        mm += S[d] * S[d];
      }
      // Pass 2: <a_i, mean> (A again, mostly from the cache).
      for (int64_t i = 0; i < n; ++i) {
        if (pair[a0 + i] < 0) dot_am[i] = dot_f64<V, RE>(row(tok[a0 + i], s.row_a), S, D);
      }
      for (int64_t i = 0; i < n; ++i) {
        if (pair[a0 + i] < 0) {
          p.out[a0 + i] = cosine(dot_am[i], norm_a[i], mm);
        } else {  // a paired token inside a segment that also has saliency tokens
          dot3<V, RE>(row(tok[a0 + i], s.row_a), row(pair[a0 + i], s.row_b), D, r);
          p.out[a0 + i] = cosine(r[0], r[1], r[2]);
        }
        flag_if_nonfinite(tok[a0 + i], norm_a[i]);
        if (fused) {
          p.out[b0 + i] = cosine(dot_ab[i], norm_a[i], norm_b[i]);
          flag_if_nonfinite(tok[b0 + i], norm_b[i]);
        }
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        dot3<V, RE>(row(tok[a0 + i], s.row_a), row(pair[a0 + i], s.row_b), D, r);
        p.out[a0 + i] = cosine(r[0], r[1], r[2]);
        flag_if_nonfinite(tok[a0 + i], r[1]);
      }
    }
    // The unit's scores are final: let the caller use them while its rows are still in cache.
    if (p.after_unit) p.after_unit(p.after_unit_ctx, seg, fused ? 2 : 1);
  }
}

template <class V, Elem E>
void video_units_typed(const VideoScoresProblem& p, int64_t u0, int64_t u1,
                                            VideoScoresScratch& s) {
  if (p.stride_d == 1) {
    video_units_impl<V, E, false>(p, u0, u1, s);
  } else {
    video_units_impl<V, E, true>(p, u0, u1, s);
  }
}

template <class V>
void video_units(const VideoScoresProblem& p, int64_t u0, int64_t u1, VideoScoresScratch& s) {
  switch (p.elem) {
    case Elem::F32:
      video_units_typed<V, Elem::F32>(p, u0, u1, s);
      break;
    case Elem::BF16:
      video_units_typed<V, Elem::BF16>(p, u0, u1, s);
      break;
    case Elem::F16:
      video_units_typed<V, Elem::F16>(p, u0, u1, s);
      break;
  }
}

}  // namespace
}  // namespace simd
}  // namespace omnisift
