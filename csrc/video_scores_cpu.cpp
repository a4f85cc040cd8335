// CPU kernel of the fused video scores (the op `omnisift::video_scores` on CPU tensors).
//
//   video_scores_cpu(x [B, L, D], token_index int64 [N], seg_offsets int64 [S+1], pair_index int64 [N])
//       -> fp32 [N]
//
// For position p of segment s (CSR: token_index[seg_offsets[s] : seg_offsets[s+1]]):
//   pair_index[p] <  0: cos(x[token_index[p]], mean of segment s)      (spatial saliency)
//   pair_index[p] >= 0: cos(x[token_index[p]], x[pair_index[p]])         (temporal similarity)
// with cos(a, b) = <a, b> / (max(|a|, eps) * max(|b|, eps)), eps = 1e-8, accumulated in fp32 (fp64 for
// fp64 inputs). Tokens are flat indices b*L + l; x is read in place through its strides (no gathered
// copy of the rows: on the CPU writing [N, D] temporaries costs more than the arithmetic).
//
// Traffic: one pass over the segments that hold at least one saliency token (the means), then one
// pass over every token reading its row and its mean or partner row. A chunk's first frame is read
// twice, its second frame once (its mean is never needed).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace omnisift {
namespace {

// ---- fp32 inner loops. The extension is built without -march flags (it must run on any x86-64), so
// the hot loops exist twice: portable C++ (8 independent partial sums, which the compiler turns into
// SSE2 code without reassociating sums itself) and, on x86-64, AVX2+FMA intrinsics picked at run time.

constexpr int kLanes = 8;

// <a, b>, |a|^2, |b|^2 of two contiguous fp32 vectors of length D, written to r[0..2].
void dot3_base(const float* __restrict a, const float* __restrict b, int64_t D, float* r) {
  float pd[kLanes] = {}, pa[kLanes] = {}, pb[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float va = a[d + j], vb = b[d + j];
      pd[j] += va * vb;
      pa[j] += va * va;
      pb[j] += vb * vb;
    }
  }
  for (; d < D; ++d) {
    pd[0] += a[d] * b[d];
    pa[0] += a[d] * a[d];
    pb[0] += b[d] * b[d];
  }
  float dot = 0, na2 = 0, nb2 = 0;
  for (int j = 0; j < kLanes; ++j) {
    dot += pd[j];
    na2 += pa[j];
    nb2 += pb[j];
  }
  r[0] = dot;
  r[1] = na2;
  r[2] = nb2;
}

// acc[d] += row[d] over a contiguous fp32 row.
void add_base(float* __restrict acc, const float* __restrict row, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += row[d];
}

// out[d] = float(row[d * sd]): a row of any input dtype, any stride, into a contiguous fp32 buffer.
template <typename scalar_t>
void to_float_base(float* __restrict out, const scalar_t* __restrict row, int64_t D, int64_t sd) {
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d * sd]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define OMNISIFT_HAVE_AVX2_PATH 1

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) void dot3_avx2(const float* a, const float* b, int64_t D, float* r) {
  __m256 d0 = _mm256_setzero_ps(), d1 = d0, a0 = d0, a1 = d0, b0 = d0, b1 = d0;
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256 x0 = _mm256_loadu_ps(a + d), x1 = _mm256_loadu_ps(a + d + 8);
    const __m256 y0 = _mm256_loadu_ps(b + d), y1 = _mm256_loadu_ps(b + d + 8);
    d0 = _mm256_fmadd_ps(x0, y0, d0);
    d1 = _mm256_fmadd_ps(x1, y1, d1);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
    b0 = _mm256_fmadd_ps(y0, y0, b0);
    b1 = _mm256_fmadd_ps(y1, y1, b1);
  }
  float dot = hsum256(_mm256_add_ps(d0, d1)), na2 = hsum256(_mm256_add_ps(a0, a1)),
        nb2 = hsum256(_mm256_add_ps(b0, b1));
  for (; d < D; ++d) {
    dot += a[d] * b[d];
    na2 += a[d] * a[d];
    nb2 += b[d] * b[d];
  }
  r[0] = dot;
  r[1] = na2;
  r[2] = nb2;
}

__attribute__((target("avx2,fma"))) void add_avx2(float* acc, const float* row, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), _mm256_loadu_ps(row + d)));
  for (; d < D; ++d) acc[d] += row[d];
}

// bf16 -> fp32 is a 16-bit shift; fp16 -> fp32 uses F16C (checked with AVX2 at run time).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void to_float_avx2(float* out, const scalar_t* row, int64_t D, int64_t sd) {
  int64_t d = 0;
  if (sd == 1) {
    const auto* bits = reinterpret_cast<const uint16_t*>(row);
    for (; d + 8 <= D; d += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + d));
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        _mm256_storeu_ps(out + d, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      } else {
        _mm256_storeu_ps(out + d, _mm256_cvtph_ps(h));
      }
    }
  }
  for (; d < D; ++d) out[d] = static_cast<float>(row[d * sd]);
}

// OMNISIFT_CPU_BASELINE=1 forces the portable loops (so that tests can run them on AVX2 machines).
bool cpu_has_avx2_fma() {
  static const bool has = [] {
    const char* forced = std::getenv("OMNISIFT_CPU_BASELINE");
    if (forced && forced[0] == '1') return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}
#endif

struct Fp32Loops {
  void (*dot3)(const float*, const float*, int64_t, float*);
  void (*add)(float*, const float*, int64_t);
};

Fp32Loops fp32_loops() {
#ifdef OMNISIFT_HAVE_AVX2_PATH
  if (cpu_has_avx2_fma()) return {&dot3_avx2, &add_avx2};
#endif
  return {&dot3_base, &add_base};
}

template <typename scalar_t>
auto to_float_loop() -> void (*)(float*, const scalar_t*, int64_t, int64_t) {
#ifdef OMNISIFT_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (cpu_has_avx2_fma()) return &to_float_avx2<scalar_t>;
  }
#endif
  return &to_float_base<scalar_t>;
}

// ---- fp64 inputs: plain loops in double (rare; tests and gradchecks).

inline void dot3_f64(const double* a, const double* b_row, const double* b_acc, int64_t D, int64_t sd, double* r) {
  double dot = 0, na2 = 0, nb2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double va = a[d * sd], vb = b_acc ? b_acc[d] : b_row[d * sd];
    dot += va * vb;
    na2 += va * va;
    nb2 += vb * vb;
  }
  r[0] = dot;
  r[1] = na2;
  r[2] = nb2;
}

template <typename scalar_t>
void video_scores_kernel(const at::Tensor& x, const at::Tensor& token_index, const at::Tensor& seg_offsets,
                         const at::Tensor& pair_index, at::Tensor& out) {
  constexpr bool kDouble = std::is_same_v<scalar_t, double>;
  using acc_t = std::conditional_t<kDouble, double, float>;
  // fp32 rows with unit stride are read in place; anything else is converted row by row into a
  // per-thread fp32 buffer first (bf16/fp16 rows are half the bytes, so the conversion is cheap).
  const int64_t L = x.size(1), D = x.size(2);
  const int64_t sb = x.stride(0), sl = x.stride(1), sd = x.stride(2);
  const int64_t N = token_index.size(0), S = seg_offsets.size(0) - 1;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t* tok = token_index.const_data_ptr<int64_t>();
  const int64_t* off = seg_offsets.const_data_ptr<int64_t>();
  const int64_t* pair = pair_index.const_data_ptr<int64_t>();
  float* outp = out.data_ptr<float>();
  auto row = [&](int64_t t) -> const scalar_t* {
    const int64_t b = t / L;
    return xp + b * sb + (t - b * L) * sl;
  };
  const bool in_place = std::is_same_v<scalar_t, float> && sd == 1;

  // Segment means, only where some token needs one.
  at::Tensor means = at::zeros({std::max<int64_t>(S, 1), D}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* mp = means.data_ptr<acc_t>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> buf(kDouble || in_place ? 0 : D);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t a = off[s], e = off[s + 1];
      bool needed = false;
      for (int64_t p = a; p < e && !needed; ++p) needed = pair[p] < 0;
      if (!needed) continue;
      acc_t* m = mp + s * D;
      for (int64_t p = a; p < e; ++p) {
        const scalar_t* r = row(tok[p]);
        if constexpr (kDouble) {
          for (int64_t d = 0; d < D; ++d) m[d] += r[d * sd];
        } else {
          const Fp32Loops loops = fp32_loops();
          const float* rf;
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (in_place) {
              rf = r;
            } else {
              to_float_loop<scalar_t>()(buf.data(), r, D, sd);
              rf = buf.data();
            }
          } else {
            to_float_loop<scalar_t>()(buf.data(), r, D, sd);
            rf = buf.data();
          }
          loops.add(m, rf, D);
        }
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(e - a, 1));
      for (int64_t d = 0; d < D; ++d) m[d] *= inv;
    }
  });

  // Scores: every position p, parallel over positions (segment found by binary search).
  constexpr acc_t eps = acc_t(1e-8);
  at::parallel_for(0, N, 64, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf_a(kDouble || in_place ? 0 : D), buf_b(kDouble || in_place ? 0 : D);
    const Fp32Loops loops = fp32_loops();
    const auto to_float = to_float_loop<scalar_t>();
    for (int64_t p = p0; p < p1; ++p) {
      acc_t r[3];
      const bool saliency = pair[p] < 0;
      const acc_t* mean = nullptr;
      if (saliency) {
        const int64_t s = std::upper_bound(off, off + S + 1, p) - off - 1;
        mean = mp + s * D;
      }
      if constexpr (kDouble) {
        dot3_f64(row(tok[p]), saliency ? nullptr : row(pair[p]), mean, D, sd, r);
      } else {
        const float *fa, *fb;
        if (in_place) {
          fa = reinterpret_cast<const float*>(row(tok[p]));
          fb = saliency ? mean : reinterpret_cast<const float*>(row(pair[p]));
        } else {
          to_float(buf_a.data(), row(tok[p]), D, sd);
          fa = buf_a.data();
          if (saliency) {
            fb = mean;
          } else {
            to_float(buf_b.data(), row(pair[p]), D, sd);
            fb = buf_b.data();
          }
        }
        loops.dot3(fa, fb, D, r);
      }
      const acc_t denom = std::max(std::sqrt(r[1]), eps) * std::max(std::sqrt(r[2]), eps);
      outp[p] = static_cast<float>(r[0] / denom);
    }
  });
}

at::Tensor video_scores_cpu(const at::Tensor& x, const at::Tensor& token_index, const at::Tensor& seg_offsets,
                            const at::Tensor& pair_index) {
  TORCH_CHECK_VALUE(x.dim() == 3, "video_scores_cpu: x must be [B, L, D], got ", x.sizes());
  TORCH_CHECK_VALUE(token_index.dim() == 1 && pair_index.sizes() == token_index.sizes(),
                    "video_scores_cpu: token_index and pair_index must be [N], got ", token_index.sizes(), " and ",
                    pair_index.sizes());
  TORCH_CHECK_VALUE(seg_offsets.dim() == 1 && seg_offsets.size(0) >= 1,
                    "video_scores_cpu: seg_offsets must be [S+1], got ", seg_offsets.sizes());
  for (const auto* t : {&token_index, &seg_offsets, &pair_index}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, "video_scores_cpu: index tensors must be int64, got ",
                     t->scalar_type());
  }
  const at::Tensor tok = token_index.contiguous(), off = seg_offsets.contiguous(), pr = pair_index.contiguous();
  at::Tensor out = at::empty({tok.size(0)}, x.options().dtype(at::kFloat));
  if (tok.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "video_scores_cpu",
                                  [&] { video_scores_kernel<scalar_t>(x, tok, off, pr, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnisift, m) {
  m.def("video_scores_cpu(Tensor x, Tensor token_index, Tensor seg_offsets, Tensor pair_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(omnisift, CPU, m) { m.impl("video_scores_cpu", &video_scores_cpu); }

}  // namespace omnisift
