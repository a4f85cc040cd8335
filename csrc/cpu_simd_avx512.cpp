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

// ---- The selector's chunk attention (ChunkAttentionProblem), one (chunk, head) item at a time, in fp32
// (bf16/fp16 inputs are widened, exactly, as they are read: no widened copy of the projections).
//
// Scores are computed transposed, St[j][i] = <k_j, scale * q_i>, keys as rows and a tile of up to 64
// queries as the 4 vector lanes groups: the keys' elements are broadcast straight from their rows,
// only the small query tile is packed (transposed, pre-scaled), and the softmax over the keys of
// query i runs down column i, i.e. element-wise over rows. Then out_i = sum_j St[j][i] v_j / sum_j
// St[j][i] with value rows read in place. Register blocks: 6 keys x 64 queries (24 accumulators)
// for the scores, 6 queries x head_dim for the values. Padding keys are skipped.
using v16 = float __attribute__((vector_size(64)));
using v16i = int32_t __attribute__((vector_size(64)));

inline v16 vload(const float* p) { return v16(_mm512_loadu_ps(p)); }
inline void vstore(float* p, v16 v) { _mm512_storeu_ps(p, __m512(v)); }
inline v16 vset(float x) { return v16(_mm512_set1_ps(x)); }
inline v16 vmax(v16 a, v16 b) { return v16(_mm512_max_ps(__m512(a), __m512(b))); }

// exp(x) for x <= 0 (softmax arguments; below -86 the result is a tiny positive number, not exact):
// x = k ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (Cephes' expf coefficients, about
// 1 ulp), times 2^k through the exponent bits.
inline v16 vexp_nonpositive(v16 x) {
  x = vmax(x, vset(-86.0f));
  const v16 kf = v16(_mm512_roundscale_ps(__m512(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  v16 r = x - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  v16 p = vset(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  const v16i bits = v16i(_mm512_castps_si512(__m512(p))) + (v16i(_mm512_cvtps_epi32(__m512(kf))) << 23);
  return v16(_mm512_castsi512_ps(__m512i(bits)));
}

// One element as fp32, exactly (fp16 through the F16C instruction rather than the portable bit
// manipulation: it sits in the score blocks' inner loop).
template <Elem E>
inline float scalar_f32(typename ElemType<E>::type x) {
  if constexpr (E == Elem::F16) {
    return _cvtsh_ss(x);
  } else {
    return to_f32<E>(x);
  }
}

// St[r][0:16 Z] = sum_d k[r][d] qt[d][0:16 Z] for the R key rows at k (row stride ks).
template <int R, int Z, Elem E>
inline void attention_scores_block(const typename ElemType<E>::type* k, int64_t ks, const float* qt, int64_t hd,
                                   float* st) {
  v16 acc[R][Z];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < Z; ++t) acc[r][t] = vset(0.0f);
  for (int64_t d = 0; d < hd; ++d) {
    v16 b[Z];
    for (int t = 0; t < Z; ++t) b[t] = vload(qt + d * 64 + 16 * t);
    for (int r = 0; r < R; ++r) {
      const v16 a = vset(scalar_f32<E>(k[r * ks + d]));
      for (int t = 0; t < Z; ++t) acc[r][t] += a * b[t];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < Z; ++t) vstore(st + r * 64 + 16 * t, acc[r][t]);
}

template <int Z, Elem E>
void attention_scores(const typename ElemType<E>::type* k, int64_t ks, const float* qt, int64_t hd, float* st,
                      int64_t n_keys) {
  int64_t j = 0;
  for (; j + 6 <= n_keys; j += 6) attention_scores_block<6, Z, E>(k + j * ks, ks, qt, hd, st + j * 64);
  const auto* kr = k + j * ks;
  float* sr = st + j * 64;
  switch (n_keys - j) {
    case 5: attention_scores_block<5, Z, E>(kr, ks, qt, hd, sr); break;
    case 4: attention_scores_block<4, Z, E>(kr, ks, qt, hd, sr); break;
    case 3: attention_scores_block<3, Z, E>(kr, ks, qt, hd, sr); break;
    case 2: attention_scores_block<2, Z, E>(kr, ks, qt, hd, sr); break;
    case 1: attention_scores_block<1, Z, E>(kr, ks, qt, hd, sr); break;
    default: break;
  }
}

// out[r][0:16 H] = inv[r] * sum_j pt[j][r] v[j][0:16 H] for R queries (pt: column r of the
// probabilities tile, row stride 64; padding keys hold 0).
// Keys are summed in blocks of kKeyBlock, the blocks' partial sums then added: the rounding error of
// a sum over n keys grows like kKeyBlock + n / kKeyBlock instead of n (thousands of keys per chunk
// come with large frames).
constexpr int64_t kKeyBlock = 128;

template <int R, int H, Elem E>
inline void attention_values_block(const typename ElemType<E>::type* v, int64_t vs, const float* pt, int64_t n_keys,
                                   const float* inv, float* out, int64_t os) {
  v16 total[R][H];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < H; ++t) total[r][t] = vset(0.0f);
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock) {
    const int64_t j1 = j0 + kKeyBlock < n_keys ? j0 + kKeyBlock : n_keys;
    v16 acc[R][H];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < H; ++t) acc[r][t] = vset(0.0f);
    for (int64_t j = j0; j < j1; ++j) {
      v16 b[H];
      for (int t = 0; t < H; ++t) b[t] = v16(VecAvx512::load<E>(v + j * vs + 16 * t));
      for (int r = 0; r < R; ++r) {
        const v16 a = vset(pt[j * 64 + r]);
        for (int t = 0; t < H; ++t) acc[r][t] += a * b[t];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < H; ++t) total[r][t] += acc[r][t];
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < H; ++t) vstore(out + r * os + 16 * t, total[r][t] * inv[r]);
}

template <int H, Elem E>
void attention_values(const typename ElemType<E>::type* v, int64_t vs, const float* pt, int64_t n_keys,
                      const float* inv, float* out, int64_t os, int64_t n_queries) {
  int64_t r = 0;
  for (; r + 6 <= n_queries; r += 6) {
    attention_values_block<6, H, E>(v, vs, pt + r, n_keys, inv + r, out + r * os, os);
  }
  const float* p = pt + r;
  const float* iv = inv + r;
  float* o = out + r * os;
  switch (n_queries - r) {
    case 5: attention_values_block<5, H, E>(v, vs, p, n_keys, iv, o, os); break;
    case 4: attention_values_block<4, H, E>(v, vs, p, n_keys, iv, o, os); break;
    case 3: attention_values_block<3, H, E>(v, vs, p, n_keys, iv, o, os); break;
    case 2: attention_values_block<2, H, E>(v, vs, p, n_keys, iv, o, os); break;
    case 1: attention_values_block<1, H, E>(v, vs, p, n_keys, iv, o, os); break;
    default: break;
  }
}

// head_dim must be 16, 32, 48 or 64 (the caller checks).
template <Elem E>
void chunk_attention_typed(const ChunkAttentionProblem& p, int64_t item0, int64_t item1, float* scratch) {
  using T = typename ElemType<E>::type;
  const int64_t hd = p.head_dim, Lv = p.num_keys, La = p.num_queries;
  float* qt = scratch;               // [hd][64]
  float* st = qt + hd * 64;          // [Lv][64]
  float* inv = st + Lv * 64;         // [64]
  for (int64_t item = item0; item < item1; ++item) {
    const int64_t c = item / p.num_heads, h = item % p.num_heads;
    const T* k = static_cast<const T*>(p.k) + c * p.kv_chunk + h * hd;
    const T* v = static_cast<const T*>(p.v) + c * p.kv_chunk + h * hd;
    const uint8_t* pad = p.key_padding ? p.key_padding + c * Lv : nullptr;
    for (int64_t i0 = 0; i0 < La; i0 += 64) {
      const int64_t n_q = La - i0 < 64 ? La - i0 : 64, Z = (n_q + 15) / 16;
      const T* q = static_cast<const T*>(p.q) + c * p.q_chunk + i0 * p.q_row + h * hd;
      for (int64_t i = 0; i < Z * 16; ++i) {
        if (i < n_q) {
          for (int64_t d = 0; d < hd; ++d) qt[d * 64 + i] = scalar_f32<E>(q[i * p.q_row + d]) * p.scale;
        } else {
          for (int64_t d = 0; d < hd; ++d) qt[d * 64 + i] = 0.0f;
        }
      }
      switch (Z) {
        case 4: attention_scores<4, E>(k, p.kv_row, qt, hd, st, Lv); break;
        case 3: attention_scores<3, E>(k, p.kv_row, qt, hd, st, Lv); break;
        case 2: attention_scores<2, E>(k, p.kv_row, qt, hd, st, Lv); break;
        default: attention_scores<1, E>(k, p.kv_row, qt, hd, st, Lv); break;
      }
      // Softmax down each column: max over the real keys, then exp in place (0 on padding) and sums.
      for (int64_t t = 0; t < Z; ++t) {
        float* col = st + 16 * t;
        v16 m = vset(-__builtin_inff());
        for (int64_t j = 0; j < Lv; ++j) {
          if (!pad || !pad[j]) m = vmax(m, vload(col + j * 64));
        }
        v16 sum = vset(0.0f), block = vset(0.0f);
        for (int64_t j = 0; j < Lv; ++j) {
          if (j % kKeyBlock == 0) {
            sum += block;
            block = vset(0.0f);
          }
          if (pad && pad[j]) {
            vstore(col + j * 64, vset(0.0f));
            continue;
          }
          const v16 e = vexp_nonpositive(vload(col + j * 64) - m);
          vstore(col + j * 64, e);
          block += e;
        }
        sum += block;
        vstore(inv + 16 * t, vset(1.0f) / sum);
      }
      float* out = p.out + c * p.out_chunk + i0 * p.out_row + h * hd;
      switch (hd / 16) {
        case 4: attention_values<4, E>(v, p.kv_row, st, Lv, inv, out, p.out_row, n_q); break;
        case 3: attention_values<3, E>(v, p.kv_row, st, Lv, inv, out, p.out_row, n_q); break;
        case 2: attention_values<2, E>(v, p.kv_row, st, Lv, inv, out, p.out_row, n_q); break;
        default: attention_values<1, E>(v, p.kv_row, st, Lv, inv, out, p.out_row, n_q); break;
      }
    }
  }
}

void chunk_attention_avx512(const ChunkAttentionProblem& p, int64_t item0, int64_t item1, float* scratch) {
  switch (p.elem) {
    case Elem::F32: chunk_attention_typed<Elem::F32>(p, item0, item1, scratch); break;
    case Elem::BF16: chunk_attention_typed<Elem::BF16>(p, item0, item1, scratch); break;
    case Elem::F16: chunk_attention_typed<Elem::F16>(p, item0, item1, scratch); break;
  }
}

const Loops kLoops = {"avx512", &video_units<VecAvx512>, &unit_pass1<VecAvx512>, &unit_pass2<VecAvx512>, &all_finite_impl,
                      &all_finite_strided_impl, &chunk_attention_avx512};

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
