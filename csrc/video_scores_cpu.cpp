// CPU kernels of the fused video scores (the op `omnisift::video_scores_cpu`) and of the fused video
// pruning built on them (`omnisift::video_keep_gather_cpu`, below).
//
//   video_scores_cpu(x [B, L, D], token_index int64 [N], seg_offsets int64 [S+1], pair_index int64 [N])
//       -> fp32 [N]
//
// For position p of segment s (CSR: token_index[seg_offsets[s] : seg_offsets[s+1]]):
//   pair_index[p] <  0: cos(x[token_index[p]], mean of segment s)      (spatial saliency)
//   pair_index[p] >= 0: cos(x[token_index[p]], x[pair_index[p]])         (temporal similarity)
// with cos(a, b) = <a, b> / (max(|a|, eps) * max(|b|, eps)), eps = 1e-8, every sum accumulated in fp64
// and the cosine rounded to fp32 (as the reference computes it, so near ties rank alike). Tokens are
// flat indices b*L + l; x is read in place through its strides (no gathered copy of the rows: on the
// CPU writing [N, D] temporaries costs more than the arithmetic).
//
// Schedule (fp32/bf16/fp16): units of work. A segment whose successor has its size, only paired
// tokens, and pairs token i with the segment's token i (a chunk's second frame, as the pipeline lays
// them out) forms one unit with it; any other segment is a unit alone. Pass 1 reads a unit's two frames
// side by side (the second frame's temporal dots, the first frame's sum and norms), pass 2 reads the
// first frame again, mostly from cache, for the dots with its mean. With many units, whole units run
// per thread; with few (a short clip, one big segment), each unit's positions are split over the
// threads. The inner loops live in csrc/cpu_simd_*.cpp, built for the portable baseline, AVX2 and
// AVX-512; cpu_loops() (cpu_dispatch.cpp) picks one per call.
#include "cpu_alloc.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_dispatch.h"

namespace omnisift {

namespace {

// fp32/bf16/fp16: the unit schedule (see the top of the file).
void video_scores_units(const at::Tensor& x, const at::Tensor& token_index, const at::Tensor& seg_offsets,
                        const at::Tensor& pair_index, at::Tensor& out, bool check_finite,
                        void (*after_unit)(void*, int64_t, int64_t) = nullptr, void* after_unit_ctx = nullptr) {
  const int64_t N = token_index.size(0), S = seg_offsets.size(0) - 1, D = x.size(2);
  const int64_t* tok = token_index.const_data_ptr<int64_t>();
  const int64_t* off = seg_offsets.const_data_ptr<int64_t>();
  const int64_t* pair = pair_index.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[S] == N, "video_scores_cpu: seg_offsets must run from 0 to N=", N,
                    ", got ", off[0], " to ", off[S]);
  int64_t nonfinite = -1;
  // Host-side checks (cheap next to the row reads): offsets non-decreasing, indices inside [0, B*L).
  const int64_t BL = x.size(0) * x.size(1);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(off[s + 1] >= off[s], "video_scores_cpu: seg_offsets must be non-decreasing");
  }
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(tok[i] >= 0 && tok[i] < BL && pair[i] < BL, "video_scores_cpu: token_index[", i, "] = ",
                      tok[i], " / pair_index[", i, "] = ", pair[i], " outside [0, B*L = ", BL, ")");
  }
  // Units: a saliency-only segment followed by its index-wise partner is fused.
  std::vector<int64_t> unit_seg;
  std::vector<uint8_t> unit_fused, unit_needs_mean;
  unit_seg.reserve(S);
  unit_fused.reserve(S);
  unit_needs_mean.reserve(S);
  int64_t max_seg = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t a = off[s], n = off[s + 1] - a;
    max_seg = std::max(max_seg, n);
    bool fuse = n > 0 && s + 1 < S && off[s + 2] - off[s + 1] == n;
    for (int64_t i = 0; i < n && fuse; ++i) fuse = pair[a + i] < 0 && pair[a + n + i] == tok[a + i];
    bool needs_mean = fuse;
    for (int64_t i = 0; i < n && !needs_mean; ++i) needs_mean = pair[a + i] < 0;
    unit_seg.push_back(s);
    unit_fused.push_back(fuse ? 1 : 0);
    unit_needs_mean.push_back(needs_mean ? 1 : 0);
    if (fuse) ++s;  // the partner segment belongs to this unit
  }
  simd::VideoScoresProblem prob{x.const_data_ptr(), elem_of(x.scalar_type()), x.size(1), D, x.stride(0),
                                x.stride(1), x.stride(2), tok, off, pair, unit_seg.data(), unit_fused.data(),
                                unit_needs_mean.data(), max_seg, check_finite, &nonfinite, out.data_ptr<float>(), after_unit,
                                after_unit_ctx};
  const simd::Loops& loops = cpu_loops();
  const int64_t U = static_cast<int64_t>(unit_seg.size());
  const int64_t threads = at::get_num_threads();
  if (U >= 2 * threads) {
    // Many units: whole units per thread (each unit's rows stay in its thread's cache).
    at::parallel_for(0, U, 1, [&](int64_t u0, int64_t u1) {
      std::vector<double> acc(static_cast<size_t>(D + 3 * max_seg));
      std::vector<float> rows(static_cast<size_t>(2 * D));
      simd::VideoScoresScratch scratch{acc.data(), rows.data(), rows.data() + D, acc.data() + D};
      loops.video_scores_units(prob, u0, u1, scratch);
    });
  } else {
    // Few units (one big segment, a short clip): each unit's positions split over the threads; the
    // mean is the sum of per-thread partial sums, added in thread order.
    std::vector<double> acc(static_cast<size_t>(3 * max_seg));
    std::vector<double> partial(static_cast<size_t>(threads * D));
    std::vector<double> mean(static_cast<size_t>(D));
    for (int64_t u = 0; u < U; ++u) {
      const int64_t seg = unit_seg[u], a = off[seg], n = off[seg + 1] - a;
      if (n <= 0) continue;
      double mm = 0.0;
      if (unit_needs_mean[u]) {
        std::fill(partial.begin(), partial.end(), 0.0);
        at::parallel_for(0, n, 8, [&](int64_t i0, int64_t i1) {
          std::vector<float> rows(static_cast<size_t>(2 * D));
          double* S = partial.data() + static_cast<int64_t>(at::get_thread_num()) * D;
          loops.unit_pass1(prob, u, i0, i1, S, acc.data(), rows.data(), rows.data() + D);
        });
        const double inv = 1.0 / static_cast<double>(n);
        for (int64_t d = 0; d < D; ++d) {
          double sum = 0.0;
          for (int64_t t = 0; t < threads; ++t) sum += partial[t * D + d];
          mean[d] = sum * inv;
          mm += mean[d] * mean[d];
        }
      }
      at::parallel_for(0, n, 8, [&](int64_t i0, int64_t i1) {
        std::vector<float> rows(static_cast<size_t>(2 * D));
        loops.unit_pass2(prob, u, i0, i1, mean.data(), mm, acc.data(), rows.data(), rows.data() + D);
      });
      if (after_unit) after_unit(after_unit_ctx, seg, unit_fused[u] ? 2 : 1);
    }
  }
  TORCH_CHECK_VALUE(nonfinite < 0, "video_scores_cpu: x holds NaN or Inf values (the row of flat token ", nonfinite,
                    ")");
}

// ---- fp64 inputs: plain loops in double (rare; tests and gradchecks): the means, then every position.

void video_scores_f64(const at::Tensor& x, const at::Tensor& token_index, const at::Tensor& seg_offsets,
                      const at::Tensor& pair_index, at::Tensor& out) {
  const int64_t L = x.size(1), D = x.size(2);
  const int64_t sb = x.stride(0), sl = x.stride(1), sd = x.stride(2);
  const int64_t N = token_index.size(0), S = seg_offsets.size(0) - 1;
  const double* xp = x.const_data_ptr<double>();
  const int64_t* tok = token_index.const_data_ptr<int64_t>();
  const int64_t* off = seg_offsets.const_data_ptr<int64_t>();
  const int64_t* pair = pair_index.const_data_ptr<int64_t>();
  float* outp = out.data_ptr<float>();
  auto row = [&](int64_t t) -> const double* {
    const int64_t b = t / L;
    return xp + b * sb + (t - b * L) * sl;
  };
  std::vector<double> means(static_cast<size_t>(std::max<int64_t>(S, 1) * D), 0.0);
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t a = off[s], e = off[s + 1];
      double* m = means.data() + s * D;
      for (int64_t p = a; p < e; ++p) {
        const double* r = row(tok[p]);
        for (int64_t d = 0; d < D; ++d) m[d] += r[d * sd];
      }
      const double inv = 1.0 / static_cast<double>(std::max<int64_t>(e - a, 1));
      for (int64_t d = 0; d < D; ++d) m[d] *= inv;
    }
  });
  at::parallel_for(0, N, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const double* a = row(tok[p]);
      const double* m = nullptr;
      const double* b = nullptr;
      if (pair[p] < 0) {
        m = means.data() + (std::upper_bound(off, off + S + 1, p) - off - 1) * D;
      } else {
        b = row(pair[p]);
      }
      double dot = 0, na2 = 0, nb2 = 0;
      for (int64_t d = 0; d < D; ++d) {
        const double va = a[d * sd], vb = m ? m[d] : b[d * sd];
        dot += va * vb;
        na2 += va * va;
        nb2 += vb * vb;
      }
      constexpr double eps = 1e-8;
      outp[p] = static_cast<float>(dot / (std::max(std::sqrt(na2), eps) * std::max(std::sqrt(nb2), eps)));
    }
  });
}

// check_finite: raise a ValueError when a row of token_index holds NaN or Inf (every row's norm is
// computed anyway; only a non-finite norm leads to an element-wise check of that row).
at::Tensor video_scores_cpu(const at::Tensor& x, const at::Tensor& token_index, const at::Tensor& seg_offsets,
                            const at::Tensor& pair_index, bool check_finite) {
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
  if (x.scalar_type() == at::kDouble) {
    video_scores_f64(x, tok, off, pr, out);
    TORCH_CHECK_VALUE(!check_finite || at::isfinite(x).all().item<bool>(),  // rare dtype: all of x
                      "video_scores_cpu: x holds NaN or Inf values");
  } else {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                     "video_scores_cpu: x must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
    video_scores_units(x, tok, off, pr, out, check_finite);
  }
  return out;
}

// ---- Fused pruning: scores, the per-segment cut and the gather of the surviving rows in one pass.
//
//   video_keep_gather_cpu(x [B, L, D], token_index [N], seg_offsets [S+1], pair_index [N], drop int64 [S],
//                         bool rows_fp32, bool check_finite) -> (keep bool [N], rows [N - sum(drop), D])
//
// keep[p] is False for the drop[s] highest-scoring tokens of each segment s (ties: the earlier position
// first; NaN ranks highest), exactly as segmented_topk_mask (both rank with first_k_ranked, see
// cpu_dispatch.h); rows are x's rows of the kept tokens in token_index order, in x's dtype or fp32
// (rows_fp32). Each unit selects and copies its survivors right after scoring them, on the same
// thread, so the rows come from cache instead of memory.

struct KeepGatherCtx {
  const float* scores;
  const int64_t* tok;
  const int64_t* off;
  const int64_t* drop;
  const int64_t* kept_offset;  // [S] first output row of each segment
  bool* keep;
  const char* x;
  int64_t L, D, sb, sl, sd, in_bytes;  // strides in elements
  at::ScalarType in_type;
  char* rows;
  int64_t out_bytes;
  bool to_fp32;
};

template <typename In, typename Out>
void copy_row(const In* src, int64_t sd, Out* dst, int64_t D) {
  if constexpr (std::is_same_v<In, Out>) {
    if (sd == 1) {
      copy_row_streaming(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src),
                         static_cast<size_t>(D) * sizeof(In));
      return;
    }
  }
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<Out>(static_cast<float>(src[d * sd]));
}

void keep_gather_after_unit(void* ctx_ptr, int64_t first_segment, int64_t num_segments) {
  const auto& c = *static_cast<const KeepGatherCtx*>(ctx_ptr);
  std::vector<int64_t> order;
  for (int64_t s = first_segment; s < first_segment + num_segments; ++s) {
    const int64_t a = c.off[s], n = c.off[s + 1] - a, k = std::clamp<int64_t>(c.drop[s], 0, n);
    for (int64_t i = 0; i < n; ++i) c.keep[a + i] = true;
    first_k_ranked(c.scores + a, n, k, order);
    for (int64_t r = 0; r < k; ++r) c.keep[a + order[r]] = false;
    int64_t out_row = c.kept_offset[s];
    for (int64_t i = 0; i < n; ++i) {
      if (!c.keep[a + i]) continue;
      const int64_t t = c.tok[a + i], b = t / c.L;
      const char* src = c.x + (b * c.sb + (t - b * c.L) * c.sl) * c.in_bytes;
      char* dst = c.rows + out_row * c.D * c.out_bytes;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.in_type, "video_keep_gather_cpu", [&] {
        const auto* in = reinterpret_cast<const scalar_t*>(src);
        if (c.to_fp32) {
          copy_row(in, c.sd, reinterpret_cast<float*>(dst), c.D);
        } else {
          copy_row(in, c.sd, reinterpret_cast<scalar_t*>(dst), c.D);
        }
      });
      ++out_row;
    }
  }
  stream_fence();
}

std::tuple<at::Tensor, at::Tensor> video_keep_gather_cpu(const at::Tensor& x, const at::Tensor& token_index,
                                                         const at::Tensor& seg_offsets, const at::Tensor& pair_index,
                                                         const at::Tensor& drop, bool rows_fp32, bool check_finite) {
  TORCH_CHECK_VALUE(x.dim() == 3, "video_keep_gather_cpu: x must be [B, L, D], got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "video_keep_gather_cpu: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(token_index.dim() == 1 && pair_index.sizes() == token_index.sizes(),
                    "video_keep_gather_cpu: token_index and pair_index must be [N]");
  const int64_t S = seg_offsets.size(0) - 1;
  TORCH_CHECK_VALUE(seg_offsets.dim() == 1 && S >= 0 && drop.dim() == 1 && drop.size(0) == S,
                    "video_keep_gather_cpu: seg_offsets must be [S+1] and drop [S], got ", seg_offsets.sizes(),
                    " and ", drop.sizes());
  for (const auto* t : {&token_index, &seg_offsets, &pair_index, &drop}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, "video_keep_gather_cpu: index tensors must be int64, got ",
                     t->scalar_type());
  }
  const at::Tensor tok = token_index.contiguous(), off = seg_offsets.contiguous(), pr = pair_index.contiguous(),
                   dr = drop.contiguous();
  const int64_t N = tok.size(0), D = x.size(2);
  const int64_t* offp = off.const_data_ptr<int64_t>();
  const int64_t* drp = dr.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(S == 0 ? N == 0 : (offp[0] == 0 && offp[S] == N),
                    "video_keep_gather_cpu: seg_offsets must run from 0 to N=", N);
  std::vector<int64_t> kept_offset(static_cast<size_t>(std::max<int64_t>(S, 1)), 0);
  int64_t kept = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = offp[s + 1] - offp[s];
    TORCH_CHECK_VALUE(n >= 0, "video_keep_gather_cpu: seg_offsets must be non-decreasing");
    kept_offset[s] = kept;
    kept += n - std::clamp<int64_t>(drp[s], 0, n);  // drop <= 0 drops nothing (as segmented_topk_mask)
  }
  at::Tensor keep = at::empty({N}, x.options().dtype(at::kBool));
  at::Tensor rows = empty_cpu_output({kept, D}, x.options().dtype(rows_fp32 ? at::kFloat : x.scalar_type()));
  at::Tensor scores = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {keep, rows};
  KeepGatherCtx ctx{scores.const_data_ptr<float>(), tok.const_data_ptr<int64_t>(), offp, drp, kept_offset.data(),
                    keep.data_ptr<bool>(), static_cast<const char*>(x.const_data_ptr()), x.size(1), D,
                    x.stride(0), x.stride(1), x.stride(2), static_cast<int64_t>(x.element_size()),
                    x.scalar_type(), static_cast<char*>(rows.data_ptr()), static_cast<int64_t>(rows.element_size()),
                    rows_fp32 && x.scalar_type() != at::kFloat};
  video_scores_units(x, tok, off, pr, scores, check_finite, &keep_gather_after_unit, &ctx);
  return {keep, rows};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnisift, m) {
  m.def("video_scores_cpu(Tensor x, Tensor token_index, Tensor seg_offsets, Tensor pair_index, "
        "bool check_finite=False) -> Tensor");
  m.def("video_keep_gather_cpu(Tensor x, Tensor token_index, Tensor seg_offsets, Tensor pair_index, Tensor drop, "
        "bool rows_fp32=False, bool check_finite=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(omnisift, CPU, m) {
  m.impl("video_scores_cpu", &video_scores_cpu);
  m.impl("video_keep_gather_cpu", &video_keep_gather_cpu);
}

}  // namespace omnisift
