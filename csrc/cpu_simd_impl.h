// Templates of the CPU inner loops over a vector policy V (see cpu_simd.h). Included by exactly one
// TU per instruction set. Everything here sits in an anonymous namespace (internal linkage) and
// calls no std:: template, so no function compiled with one TU's -m flags can be picked by the
// linker for another TU (an AVX-512 copy of std::fill serving the portable build, say).
//
// Each TU is compiled with its own -m flags (CMakeLists.txt), so no target attributes are needed.
// A policy provides: W (fp32 lanes), reg, zero(), load<E>(ptr) (W elements of type E as fp32),
// loadf/storef (fp32), fma(a, b, c) = a*b + c, add(a, b), hsum(reg).
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
// Row primitives. a, b: rows of element type E (contiguous); S, m: fp32 rows. Every sum runs in
// 2*W lanes (two registers per quantity), then W, then a scalar tail; lanes are added at the end.

// S += a, and the sums <a, b>, |a|^2, |b|^2 (HasB) or |a|^2 (no b) into r[0..2].
template <class V, Elem E, bool HasB>
inline void pass1(const typename ElemType<E>::type* a, const typename ElemType<E>::type* b,
                                       float* S, int64_t D, float* r) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg d0 = V::zero(), d1 = V::zero(), a0 = V::zero(), a1 = V::zero(), b0 = V::zero(), b1 = V::zero();
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    const reg x0 = V::template load<E>(a + d), x1 = V::template load<E>(a + d + W);
    V::storef(S + d, V::add(V::loadf(S + d), x0));
    V::storef(S + d + W, V::add(V::loadf(S + d + W), x1));
    a0 = V::fma(x0, x0, a0);
    a1 = V::fma(x1, x1, a1);
    if constexpr (HasB) {
      const reg y0 = V::template load<E>(b + d), y1 = V::template load<E>(b + d + W);
      d0 = V::fma(x0, y0, d0);
      d1 = V::fma(x1, y1, d1);
      b0 = V::fma(y0, y0, b0);
      b1 = V::fma(y1, y1, b1);
    }
  }
  for (; d + W <= D; d += W) {
    const reg x0 = V::template load<E>(a + d);
    V::storef(S + d, V::add(V::loadf(S + d), x0));
    a0 = V::fma(x0, x0, a0);
    if constexpr (HasB) {
      const reg y0 = V::template load<E>(b + d);
      d0 = V::fma(x0, y0, d0);
      b0 = V::fma(y0, y0, b0);
    }
  }
  float dot = 0.f, na2 = 0.f, nb2 = 0.f;
  for (; d < D; ++d) {
    const float x = to_f32<E>(a[d]);
    S[d] += x;
    na2 += x * x;
    if constexpr (HasB) {
      const float y = to_f32<E>(b[d]);
      dot += x * y;
      nb2 += y * y;
    }
  }
  r[0] = dot + V::hsum(V::add(d0, d1));
  r[1] = na2 + V::hsum(V::add(a0, a1));
  r[2] = nb2 + V::hsum(V::add(b0, b1));
}

// <a, m> with m fp32.
template <class V, Elem E>
inline float dot_f32(const typename ElemType<E>::type* a, const float* m, int64_t D) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg d0 = V::zero(), d1 = V::zero();
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    d0 = V::fma(V::template load<E>(a + d), V::loadf(m + d), d0);
    d1 = V::fma(V::template load<E>(a + d + W), V::loadf(m + d + W), d1);
  }
  for (; d + W <= D; d += W) d0 = V::fma(V::template load<E>(a + d), V::loadf(m + d), d0);
  float dot = 0.f;
  for (; d < D; ++d) dot += to_f32<E>(a[d]) * m[d];
  return dot + V::hsum(V::add(d0, d1));
}

// <a, b>, |a|^2, |b|^2 into r[0..2].
template <class V, Elem E>
inline void dot3(const typename ElemType<E>::type* a, const typename ElemType<E>::type* b,
                                      int64_t D, float* r) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg d0 = V::zero(), d1 = V::zero(), a0 = V::zero(), a1 = V::zero(), b0 = V::zero(), b1 = V::zero();
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    const reg x0 = V::template load<E>(a + d), x1 = V::template load<E>(a + d + W);
    const reg y0 = V::template load<E>(b + d), y1 = V::template load<E>(b + d + W);
    d0 = V::fma(x0, y0, d0);
    d1 = V::fma(x1, y1, d1);
    a0 = V::fma(x0, x0, a0);
    a1 = V::fma(x1, x1, a1);
    b0 = V::fma(y0, y0, b0);
    b1 = V::fma(y1, y1, b1);
  }
  for (; d + W <= D; d += W) {
    const reg x0 = V::template load<E>(a + d), y0 = V::template load<E>(b + d);
    d0 = V::fma(x0, y0, d0);
    a0 = V::fma(x0, x0, a0);
    b0 = V::fma(y0, y0, b0);
  }
  float dot = 0.f, na2 = 0.f, nb2 = 0.f;
  for (; d < D; ++d) {
    const float x = to_f32<E>(a[d]), y = to_f32<E>(b[d]);
    dot += x * y;
    na2 += x * x;
    nb2 += y * y;
  }
  r[0] = dot + V::hsum(V::add(d0, d1));
  r[1] = na2 + V::hsum(V::add(a0, a1));
  r[2] = nb2 + V::hsum(V::add(b0, b1));
}

// cos = dot / (max(|a|, eps) * max(|b|, eps)), as F.cosine_similarity (eps = 1e-8).
inline float cosine(float dot, float na2, float nb2) {
  constexpr float eps = 1e-8f;
  const float na = sqrtf(na2), nb = sqrtf(nb2);
  return dot / ((na > eps ? na : eps) * (nb > eps ? nb : eps));
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
  float* dot_am = s.acc;                        // <a_i, mean>
  float* norm_a = s.acc + p.max_segment;        // |a_i|^2
  float* dot_ab = s.acc + 2 * p.max_segment;    // <a_i, b_i> (fused)
  float* norm_b = s.acc + 3 * p.max_segment;    // |b_i|^2 (fused)
  // Every token's own squared norm is computed below; NaN/Inf in a row makes it non-finite (and so
  // may a finite row with huge values: only then are the row's elements checked one by one).
  auto flag_if_nonfinite = [&](int64_t t, float norm2) {
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
    float r[3];
    if (needs_mean) {
      const float inv = 1.f / static_cast<float>(n);
      float* S = s.sum;
      for (int64_t d = 0; d < D; ++d) S[d] = 0.f;
      // Pass 1: the sum and norms of A, a fused B's temporal dots (A and B read from memory).
      for (int64_t i = 0; i < n; ++i) {
        const RT* ra = row(tok[a0 + i], s.row_a);
        if (fused) {
          pass1<V, RE, true>(ra, row(tok[b0 + i], s.row_b), S, D, r);
          dot_ab[i] = r[0];
          norm_b[i] = r[2];
        } else {
          pass1<V, RE, false>(ra, nullptr, S, D, r);
        }
        norm_a[i] = r[1];
      }
      float mm = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        S[d] *= inv;  // the mean
        mm += S[d] * S[d];
      }
      // Pass 2: <a_i, mean> (A again, mostly from the cache).
      for (int64_t i = 0; i < n; ++i) {
        if (pair[a0 + i] < 0) dot_am[i] = dot_f32<V, RE>(row(tok[a0 + i], s.row_a), S, D);
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
