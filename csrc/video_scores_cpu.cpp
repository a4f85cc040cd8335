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
#include <type_traits>

namespace omnisift {
namespace {

constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorise the reductions

template <typename scalar_t, typename acc_t>
inline void add_row(acc_t* __restrict acc, const scalar_t* row, int64_t D, int64_t sd) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d * sd]);
  }
}

// Returns <a, b>, |a|^2, |b|^2 of a row of x and a vector b given either as a row of x (b_row) or as
// an accumulator-typed vector (b_acc).
template <typename scalar_t, typename acc_t>
inline void dot_norms(const scalar_t* a, const scalar_t* b_row, const acc_t* b_acc, int64_t D, int64_t sd,
                      acc_t& dot, acc_t& na2, acc_t& nb2) {
  acc_t pd[kLanes] = {}, pa[kLanes] = {}, pb[kLanes] = {};
  int64_t d = 0;
  if (sd == 1) {
    for (; d + kLanes <= D; d += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t va = static_cast<acc_t>(a[d + j]);
        const acc_t vb = b_acc ? b_acc[d + j] : static_cast<acc_t>(b_row[d + j]);
        pd[j] += va * vb;
        pa[j] += va * va;
        pb[j] += vb * vb;
      }
    }
  }
  for (; d < D; ++d) {
    const acc_t va = static_cast<acc_t>(a[d * sd]);
    const acc_t vb = b_acc ? b_acc[d] : static_cast<acc_t>(b_row[d * sd]);
    pd[0] += va * vb;
    pa[0] += va * va;
    pb[0] += vb * vb;
  }
  dot = na2 = nb2 = 0;
  for (int j = 0; j < kLanes; ++j) {
    dot += pd[j];
    na2 += pa[j];
    nb2 += pb[j];
  }
}

template <typename scalar_t>
void video_scores_kernel(const at::Tensor& x, const at::Tensor& token_index, const at::Tensor& seg_offsets,
                         const at::Tensor& pair_index, at::Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
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

  // Segment means, only where some token needs one.
  at::Tensor means = at::zeros({std::max<int64_t>(S, 1), D}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* mp = means.data_ptr<acc_t>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t a = off[s], e = off[s + 1];
      bool needed = false;
      for (int64_t p = a; p < e && !needed; ++p) needed = pair[p] < 0;
      if (!needed) continue;
      acc_t* m = mp + s * D;
      for (int64_t p = a; p < e; ++p) add_row<scalar_t, acc_t>(m, row(tok[p]), D, sd);
      const acc_t inv = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(e - a, 1));
      for (int64_t d = 0; d < D; ++d) m[d] *= inv;
    }
  });

  // Scores: every position p, parallel over positions (segment found by binary search).
  constexpr acc_t eps = acc_t(1e-8);
  at::parallel_for(0, N, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      acc_t dot, na2, nb2;
      if (pair[p] < 0) {
        const int64_t s = std::upper_bound(off, off + S + 1, p) - off - 1;
        dot_norms<scalar_t, acc_t>(row(tok[p]), nullptr, mp + s * D, D, sd, dot, na2, nb2);
      } else {
        dot_norms<scalar_t, acc_t>(row(tok[p]), row(pair[p]), nullptr, D, sd, dot, na2, nb2);
      }
      const acc_t denom = std::max(std::sqrt(na2), eps) * std::max(std::sqrt(nb2), eps);
      outp[p] = static_cast<float>(dot / denom);
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
