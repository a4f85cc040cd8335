// CPU kernels of variable-length compaction, the op schemas (TORCH_LIBRARY(omnisift)) and a trivial
// Python module init so that `from omnisift_kernels import _C` loads the library (registration happens
// in static initializers; no torch_python symbols are used).
//
// Ops (all rows are copied byte-wise, so every dtype is supported and results are exact):
//   varlen_compact(x [B, L, D], keep [B, L] bool, position_ids? [B, L] | [K, B, L], labels? [B, L],
//                  total?) -> (packed [T, D], indices int64 [T], cu_seqlens int32 [B+1], max_seqlen int,
//                              position_ids_out [T] | [K, T] (or empty [0]), labels_out [T] (or empty [0]))
//       flash-attn unpad_input order (row-major order of kept positions). max_seqlen is -1 when total
//       is given (the CUDA kernel is then sync-free). On the CPU total is always checked (free).
//   varlen_scatter(packed [T, D], indices int64 [T], batch, seqlen, fill) -> [batch, seqlen, D]
//       out.view(B*L, D)[indices[t]] = packed[t]; other rows = fill; indices outside [0, B*L) skipped.
//   varlen_gather(src [N, D], indices int64 [T]) -> [T, D]
//       out[t] = src[indices[t]]; indices outside [0, N) give zero rows.
//   cpu_output_cache_bytes() -> int, cpu_output_cache_limit() -> int, release_cpu_output_cache() -> int
//       the cache of freed CPU outputs of 256 KiB or more (cpu_alloc.h): bytes held; bytes it may hold;
//       free them all.

#include "varlen.h"

#include "cpu_alloc.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace omnisift {

void check_compact_args(const at::Tensor& x, const at::Tensor& keep,
                        const std::optional<at::Tensor>& position_ids,
                        const std::optional<at::Tensor>& labels, std::optional<int64_t> total) {
  TORCH_CHECK_VALUE(x.dim() == 3, "varlen_compact: x must be [B, L, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(keep.dim() == 2, "varlen_compact: keep must be [B, L], got shape ", keep.sizes());
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, "varlen_compact: keep must be bool, got ",
                   keep.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) == keep.size(0) && x.size(1) == keep.size(1),
                    "varlen_compact: keep must be [B, L] = ", x.sizes().slice(0, 2), ", got ", keep.sizes());
  TORCH_CHECK_VALUE(keep.device() == x.device(), "varlen_compact: keep must be on ", x.device(), ", got ",
                    keep.device());
  if (position_ids.has_value()) {
    const auto& p = *position_ids;
    const bool ok = (p.dim() == 2 && p.size(0) == x.size(0) && p.size(1) == x.size(1)) ||
                    (p.dim() == 3 && p.size(1) == x.size(0) && p.size(2) == x.size(1));
    TORCH_CHECK_VALUE(ok, "varlen_compact: position_ids must be [B, L] or [K, B, L] with B, L = ",
                      x.sizes().slice(0, 2), ", got ", p.sizes());
    TORCH_CHECK_VALUE(p.device() == x.device(), "varlen_compact: position_ids must be on ", x.device(),
                      ", got ", p.device());
  }
  if (labels.has_value()) {
    const auto& t = *labels;
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1),
                      "varlen_compact: labels must be [B, L] = ", x.sizes().slice(0, 2), ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), "varlen_compact: labels must be on ", x.device(), ", got ",
                      t.device());
  }
  if (total.has_value()) {
    TORCH_CHECK_VALUE(*total >= 0 && *total <= x.size(0) * x.size(1), "varlen_compact: total must be in [0, B*L = ",
                      x.size(0) * x.size(1), "], got ", *total);
  }
}

void check_index_args(const char* op, const at::Tensor& rows, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(rows.dim() == 2, op, ": expected a 2-D [rows, D] tensor, got shape ", rows.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 1, op, ": indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == rows.device(), op, ": indices must be on ", rows.device(), ", got ",
                    indices.device());
}

at::Tensor positions_as_3d(const at::Tensor& position_ids) {
  return position_ids.dim() == 2 ? position_ids.unsqueeze(0) : position_ids;
}

namespace {

inline void copy_elem(char* dst, const char* src, int64_t size) {
  switch (size) {
    case 8: std::memcpy(dst, src, 8); break;
    case 4: std::memcpy(dst, src, 4); break;
    case 2: std::memcpy(dst, src, 2); break;
    case 1: *dst = *src; break;
    default: std::memcpy(dst, src, static_cast<size_t>(size));
  }
}

// Grain sizes: at least ~64 KiB of copying per task.
inline int64_t grain_for(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
}

CompactResult varlen_compact_cpu(const at::Tensor& x_in, const at::Tensor& keep_in,
                                 const std::optional<at::Tensor>& position_ids,
                                 const std::optional<at::Tensor>& labels, std::optional<int64_t> total) {
  check_compact_args(x_in, keep_in, position_ids, labels, total);
  const int64_t B = x_in.size(0), L = x_in.size(1), D = x_in.size(2), N = B * L;
  // Rows must be contiguous in D for memcpy; other strides (sliced / transposed B, L) are fine.
  const at::Tensor x = (x_in.stride(2) == 1 || D <= 1) ? x_in : x_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const bool* kp = keep.data_ptr<bool>();

  // Per-row counts, then an exclusive prefix sum (B is small: serial).
  std::vector<int64_t> cu(static_cast<size_t>(B) + 1, 0);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c = 0;
      const bool* row = kp + b * L;
      for (int64_t l = 0; l < L; ++l) c += row[l] ? 1 : 0;
      cu[b + 1] = c;
    }
  });
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    max_len = std::max(max_len, cu[b + 1]);
    cu[b + 1] += cu[b];
  }
  const int64_t actual = cu[B];
  TORCH_CHECK_VALUE(!total.has_value() || *total == actual, "varlen_compact: total=", total.value_or(-1),
                    " but keep has ", actual, " kept positions");
  const int64_t T = actual;

  auto cu_t = at::empty({B + 1}, keep.options().dtype(at::kInt));
  int32_t* cup = cu_t.data_ptr<int32_t>();
  for (int64_t b = 0; b <= B; ++b) cup[b] = static_cast<int32_t>(cu[b]);

  auto indices = at::empty({T}, keep.options().dtype(at::kLong));
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t t = cu[b];
      const bool* row = kp + b * L;
      for (int64_t l = 0; l < L; ++l)
        if (row[l]) ip[t++] = b * L + l;
    }
  });

  auto packed = empty_cpu_output({T, D}, x.options());
  const int64_t isz = static_cast<int64_t>(x.element_size());
  const int64_t row_bytes = D * isz;
  const int64_t sb = x.stride(0) * isz, sl = x.stride(1) * isz;
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* pp = static_cast<char*>(packed.data_ptr());

  at::Tensor pos_out, lab_out;
  const char* posp = nullptr;
  char* pos_outp = nullptr;
  int64_t K = 0, pisz = 0, psk = 0, psb = 0, psl = 0;
  if (position_ids.has_value()) {
    const at::Tensor p3 = positions_as_3d(*position_ids);
    K = p3.size(0);
    pos_out = position_ids->dim() == 2 ? at::empty({T}, p3.options()) : at::empty({K, T}, p3.options());
    pisz = static_cast<int64_t>(p3.element_size());
    psk = p3.stride(0) * pisz, psb = p3.stride(1) * pisz, psl = p3.stride(2) * pisz;
    posp = static_cast<const char*>(p3.const_data_ptr());
    pos_outp = static_cast<char*>(pos_out.data_ptr());
  } else {
    pos_out = at::empty({0}, keep.options().dtype(at::kLong));
  }
  const char* labp = nullptr;
  char* lab_outp = nullptr;
  int64_t lisz = 0, lsb = 0, lsl = 0;
  if (labels.has_value()) {
    lab_out = at::empty({T}, labels->options());
    lisz = static_cast<int64_t>(labels->element_size());
    lsb = labels->stride(0) * lisz, lsl = labels->stride(1) * lisz;
    labp = static_cast<const char*>(labels->const_data_ptr());
    lab_outp = static_cast<char*>(lab_out.data_ptr());
  } else {
    lab_out = at::empty({0}, keep.options().dtype(at::kLong));
  }

  at::parallel_for(0, T, grain_for(row_bytes + 64), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = ip[t], b = i / L, l = i % L;
      const char* next = nullptr;  // the next row, prefetched while this one is copied
      if (t + 1 < t1) next = xp + (ip[t + 1] / L) * sb + (ip[t + 1] % L) * sl;
      if (row_bytes > 0)
        copy_row_streaming(pp + t * row_bytes, xp + b * sb + l * sl, static_cast<size_t>(row_bytes), next);
      for (int64_t k = 0; k < K; ++k)
        copy_elem(pos_outp + (k * T + t) * pisz, posp + k * psk + b * psb + l * psl, pisz);
      if (labp != nullptr) copy_elem(lab_outp + t * lisz, labp + b * lsb + l * lsl, lisz);
    }
    stream_fence();
  });
  (void)N;
  return {packed, indices, cu_t, c10::SymInt(total.has_value() ? int64_t{-1} : max_len), pos_out, lab_out};
}

at::Tensor varlen_scatter_cpu(const at::Tensor& packed_in, const at::Tensor& indices_in, int64_t batch,
                              int64_t seqlen, const at::Scalar& fill) {
  check_index_args("varlen_scatter", packed_in, indices_in);
  TORCH_CHECK_VALUE(packed_in.size(0) == indices_in.size(0), "varlen_scatter: packed has ", packed_in.size(0),
                    " rows but indices has ", indices_in.size(0));
  TORCH_CHECK_VALUE(batch >= 0 && seqlen >= 0, "varlen_scatter: batch and seqlen must be >= 0, got ", batch, ", ",
                    seqlen);
  const int64_t T = packed_in.size(0), D = packed_in.size(1), N = batch * seqlen;
  const at::Tensor packed = (packed_in.stride(1) == 1 || D <= 1) ? packed_in : packed_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  auto out = at::full({batch, seqlen, D}, fill, packed.options());
  const int64_t isz = static_cast<int64_t>(packed.element_size()), row_bytes = D * isz;
  const int64_t ss = packed.stride(0) * isz;
  const char* sp = static_cast<const char*>(packed.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  if (row_bytes == 0) return out;
  at::parallel_for(0, T, grain_for(row_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = ip[t];
      if (i >= 0 && i < N) std::memcpy(op + i * row_bytes, sp + t * ss, static_cast<size_t>(row_bytes));
    }
  });
  return out;
}

at::Tensor varlen_gather_cpu(const at::Tensor& src_in, const at::Tensor& indices_in) {
  check_index_args("varlen_gather", src_in, indices_in);
  const int64_t N = src_in.size(0), D = src_in.size(1), T = indices_in.size(0);
  const at::Tensor src = (src_in.stride(1) == 1 || D <= 1) ? src_in : src_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  auto out = empty_cpu_output({T, D}, src.options());
  const int64_t isz = static_cast<int64_t>(src.element_size()), row_bytes = D * isz;
  const int64_t ss = src.stride(0) * isz;
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  if (row_bytes == 0) return out;
  at::parallel_for(0, T, grain_for(row_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = ip[t];
      const int64_t next = t + 1 < t1 ? ip[t + 1] : -1;  // its row is prefetched while this one is copied
      if (i >= 0 && i < N)
        copy_row_streaming(op + t * row_bytes, sp + i * ss, static_cast<size_t>(row_bytes),
                           next >= 0 && next < N ? sp + next * ss : nullptr);
      else
        std::memset(op + t * row_bytes, 0, static_cast<size_t>(row_bytes));
    }
    stream_fence();
  });
  return out;
}

}  // namespace
}  // namespace omnisift

TORCH_LIBRARY(omnisift, m) {
  m.def(
      "varlen_compact(Tensor x, Tensor keep, Tensor? position_ids=None, Tensor? labels=None, int? total=None) -> "
      "(Tensor packed, Tensor indices, Tensor cu_seqlens, SymInt max_seqlen, Tensor position_ids_out, "
      "Tensor labels_out)");
  m.def("varlen_scatter(Tensor packed, Tensor indices, int batch, int seqlen, Scalar fill=0) -> Tensor");
  m.def("varlen_gather(Tensor src, Tensor indices) -> Tensor");
  // The cache of freed CPU outputs (cpu_alloc.h): bytes held now; bytes it may hold (0: off); free them
  // all (returns the bytes).
  m.def("cpu_output_cache_bytes() -> int", &omnisift::cpu_output_cache_bytes);
  m.def("cpu_output_cache_limit() -> int", &omnisift::cpu_output_cache_limit_bytes);
  m.def("release_cpu_output_cache() -> int", &omnisift::release_cpu_output_cache);
  // Reads the OMNISIFT_CPU_* settings from the environment again (cpu_settings.h; else read once).
  m.def("reload_cpu_settings() -> bool", &omnisift::reload_cpu_settings);
  // Opens/closes a scope in which torch's CPU allocator takes blocks of 256 KiB or more from that cache.
  m.def("cpu_allocator_scope(bool enter) -> bool", &omnisift::cpu_allocator_scope);
  m.def("cpu_allocator_suspend(bool suspend) -> bool", &omnisift::cpu_allocator_suspend);
}

TORCH_LIBRARY_IMPL(omnisift, CPU, m) {
  m.impl("varlen_compact", &omnisift::varlen_compact_cpu);
  m.impl("varlen_scatter", &omnisift::varlen_scatter_cpu);
  m.impl("varlen_gather", &omnisift::varlen_gather_cpu);
}

// `from omnisift_kernels import _C` only needs a module object: the ops above are registered by static
// initializers when the shared library is loaded.
static struct PyModuleDef omnisift_c_module = {PyModuleDef_HEAD_INIT, "_C", "omnisift_kernels C++/CUDA ops "
                                               "(registered in torch.ops.omnisift)", -1, nullptr,
                                               nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&omnisift_c_module); }
