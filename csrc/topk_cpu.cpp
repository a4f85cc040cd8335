// CPU kernel of the per-segment top-k mask (the op `omnisift::segmented_topk_mask_cpu`), the CPU kernel
// of omnisift_kernels.ops.segmented_topk_mask.
//
//   segmented_topk_mask_cpu(scores fp32 [N], seg_offsets int64 [S+1], k int64 [S]) -> bool [N]
//
// Per segment s (positions seg_offsets[s] : seg_offsets[s+1]), True for the k[s] first positions ranked
// by score descending (NaN first), ties by position (k <= 0: none, k >= size: all). The ranking is
// first_k_ranked (cpu_dispatch.cpp), which video_keep_gather_cpu uses too. Segments run in parallel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_dispatch.h"

namespace omnisift {
namespace {

at::Tensor segmented_topk_mask_cpu(const at::Tensor& scores, const at::Tensor& seg_offsets, const at::Tensor& k) {
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat && seg_offsets.scalar_type() == at::kLong &&
                       k.scalar_type() == at::kLong,
                   "segmented_topk_mask_cpu: expected float32 scores and int64 offsets and k");
  const int64_t N = scores.numel(), S = seg_offsets.numel() - 1;
  TORCH_CHECK_VALUE(scores.dim() == 1 && seg_offsets.dim() == 1 && S >= 0 && k.dim() == 1 && k.numel() == S,
                    "segmented_topk_mask_cpu: scores must be [N], seg_offsets [S+1] and k [S]");
  const at::Tensor sc = scores.contiguous(), off = seg_offsets.contiguous(), kk = k.contiguous();
  const float* sp = sc.const_data_ptr<float>();
  const int64_t* op = off.const_data_ptr<int64_t>();
  const int64_t* kp = kk.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(S == 0 ? true : (op[0] == 0 && op[S] == N), "segmented_topk_mask_cpu: seg_offsets must run from 0 to N=", N);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(op[s + 1] >= op[s], "segmented_topk_mask_cpu: seg_offsets must be non-decreasing");
  }
  at::Tensor out = at::zeros({N}, scores.options().dtype(at::kBool));
  bool* mp = out.data_ptr<bool>();
  at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
    std::vector<int64_t> order;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t a = op[s], n = op[s + 1] - a, take = std::clamp<int64_t>(kp[s], 0, n);
      first_k_ranked(sp + a, n, take, order);
      for (int64_t r = 0; r < take; ++r) mp[a + order[r]] = true;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnisift, m) {
  m.def("segmented_topk_mask_cpu(Tensor scores, Tensor seg_offsets, Tensor k) -> Tensor");
}

TORCH_LIBRARY_IMPL(omnisift, CPU, m) { m.impl("segmented_topk_mask_cpu", &segmented_topk_mask_cpu); }

}  // namespace omnisift
