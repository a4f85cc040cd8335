// CPU kernel of the finiteness check (the op `omnisift::all_finite_cpu`).
//
//   all_finite_cpu(x, skip_rows bool [B, L] or None) -> bool scalar tensor
//
// True when x holds no NaN and no +-Inf. One read of x at memory speed (the exponent bits of every
// element; the inner loops of cpu_simd_*.cpp for fp32/bf16/fp16, a plain loop for fp64), in parallel
// blocks. Integers and bool are always
// finite; other floating dtypes (float8, complex) go through at::isfinite. With skip_rows (for x
// [B, L, D]; not for fp64), the rows where it is True are not read: the video rows, which
// video_scores_cpu checks itself while it reads them (check_finite).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <optional>

#include "cpu_dispatch.h"

namespace omnisift {
namespace {

at::Tensor all_finite_cpu(const at::Tensor& x, const std::optional<at::Tensor>& skip_rows) {
  at::Tensor out = at::empty({}, x.options().dtype(at::kBool));
  const at::ScalarType t = x.scalar_type();
  if (!at::isFloatingType(t) && !at::isComplexType(t)) {  // integers and bool are always finite
    out.fill_(true);
    return out;
  }
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf && t != at::kDouble) {
    return at::isfinite(x).all();  // float8 and other rare dtypes: no inner loop here
  }
  std::atomic<bool> finite{true};
  if (skip_rows.has_value()) {
    TORCH_CHECK_VALUE(x.dim() == 3, "all_finite_cpu: skip_rows needs x [B, L, D], got ", x.sizes());
    const at::Tensor skip = skip_rows->contiguous();
    TORCH_CHECK_VALUE(skip.scalar_type() == at::kBool && skip.numel() == x.size(0) * x.size(1),
                      "all_finite_cpu: skip_rows must be bool with B*L = ", x.size(0) * x.size(1),
                      " elements, got ", skip.scalar_type(), " ", skip.sizes());
    TORCH_CHECK_TYPE(t != at::kDouble, "all_finite_cpu: skip_rows is not supported for float64");
    const bool* sk = skip.const_data_ptr<bool>();
    const int64_t L = x.size(1), D = x.size(2), sb = x.stride(0), sl = x.stride(1), sd = x.stride(2);
    const int64_t bytes = static_cast<int64_t>(x.element_size());
    const char* base = static_cast<const char*>(x.const_data_ptr());
    const simd::Elem elem = elem_of(t);
    const simd::Loops& loops = cpu_loops();
    at::parallel_for(0, x.size(0) * L, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1 && finite.load(std::memory_order_relaxed); ++r) {
        if (sk[r]) continue;
        const int64_t b = r / L;
        const char* row = base + (b * sb + (r - b * L) * sl) * bytes;
        const bool ok = sd == 1 ? loops.all_finite(row, elem, D) : loops.all_finite_strided(row, elem, D, sd);
        if (!ok) finite = false;
      }
    });
    out.fill_(finite.load());
    return out;
  }
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  if (t == at::kDouble) {
    const uint64_t* w = static_cast<const uint64_t*>(xc.const_data_ptr());
    at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if ((w[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull) {
          finite = false;
          return;
        }
      }
    });
  } else {
    const simd::Elem elem = elem_of(t);
    const int64_t bytes = static_cast<int64_t>(xc.element_size());
    const char* base = static_cast<const char*>(xc.const_data_ptr());
    const simd::Loops& loops = cpu_loops();
    at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
      if (finite.load(std::memory_order_relaxed) && !loops.all_finite(base + i0 * bytes, elem, i1 - i0)) {
        finite = false;
      }
    });
  }
  out.fill_(finite.load());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnisift, m) { m.def("all_finite_cpu(Tensor x, Tensor? skip_rows=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(omnisift, CPU, m) { m.impl("all_finite_cpu", &all_finite_cpu); }

}  // namespace omnisift
