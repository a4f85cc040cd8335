// CPU kernel of the selector's batched cross attention (the op `omnisift::chunk_attention_cpu`).
//
//   chunk_attention_cpu(q [C, La, E], k [C, Lv, E], v [C, Lv, E], key_padding bool [C, Lv] or None,
//                       int num_heads) -> fp32 [C, La, E]   (q, k, v: one dtype, fp32, bf16 or fp16)
//
// Per chunk c and head h (head_dim = E / num_heads, the h-th slice of width head_dim of every row):
// scaled dot-product attention of the chunk's queries to its keys, scale 1 / sqrt(head_dim), keys
// where key_padding is True left out; what F.scaled_dot_product_attention computes on
// [C, num_heads, L, head_dim] views with a -inf mask on the padding, with fp32 accumulation in a
// different order (results agree to fp32 rounding; bf16/fp16 inputs are widened exactly as they are read,
// the output stays fp32 for the caller to round). Tensors whose last dimension is contiguous
// (views such as the key and value halves of one projection are read in place); head_dim 16, 32, 48 or
// 64; every chunk needs at least one real key. The kernel is the AVX-512 build's (cpu_simd_avx512.cpp):
// `chunk_attention_cpu_available()` says whether this process has it (an AVX-512 CPU and no
// OMNISIFT_CPU_ISA cap below it); the Python side falls back to scaled_dot_product_attention elsewhere.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu_dispatch.h"

namespace omnisift {
namespace {

bool chunk_attention_cpu_available() { return cpu_loops().chunk_attention != nullptr; }

at::Tensor chunk_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_padding, int64_t num_heads) {
  const auto kernel = cpu_loops().chunk_attention;
  TORCH_CHECK(kernel != nullptr, "chunk_attention_cpu: needs the AVX-512 CPU kernels, this process uses '",
              cpu_loops().isa, "' (check chunk_attention_cpu_available() first)");
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "chunk_attention_cpu: q, k and v must be float32, bfloat16 or float16, got ", dtype);
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, "chunk_attention_cpu: q, k and v must have one dtype, got ",
                     q.scalar_type(), ", ", k.scalar_type(), " and ", v.scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 3 && t->stride(2) == 1,
                      "chunk_attention_cpu: q, k and v must be CPU tensors [C, L, E] with a contiguous last "
                      "dimension, got ", t->sizes(), " strides ", t->strides());
  }
  const int64_t C = q.size(0), La = q.size(1), E = q.size(2), Lv = k.size(1);
  TORCH_CHECK_VALUE(k.size(0) == C && v.size(0) == C && k.size(2) == E && v.size(2) == E && v.size(1) == Lv,
                    "chunk_attention_cpu: expected q [C, La, E] and k, v [C, Lv, E], got ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(num_heads >= 1 && E % num_heads == 0, "chunk_attention_cpu: num_heads must divide E=", E,
                    ", got ", num_heads);
  TORCH_CHECK_VALUE(k.stride(0) == v.stride(0) && k.stride(1) == v.stride(1),
                    "chunk_attention_cpu: k and v must have the same strides, got ", k.strides(), " and ",
                    v.strides());
  const int64_t hd = E / num_heads;
  TORCH_CHECK_VALUE(hd == 16 || hd == 32 || hd == 48 || hd == 64,
                    "chunk_attention_cpu: head_dim must be 16, 32, 48 or 64, got ", hd);
  TORCH_CHECK_VALUE(Lv >= 1 || C * La == 0, "chunk_attention_cpu: every chunk needs a key, got Lv=0");
  at::Tensor pad;
  if (key_padding.has_value() && key_padding->defined()) {
    TORCH_CHECK_VALUE(key_padding->scalar_type() == at::kBool && key_padding->sizes() == at::IntArrayRef({C, Lv}),
                      "chunk_attention_cpu: key_padding must be bool [C, Lv] = [", C, ", ", Lv, "], got ",
                      key_padding->scalar_type(), " ", key_padding->sizes());
    pad = key_padding->contiguous();
    const bool* pp = pad.const_data_ptr<bool>();
    for (int64_t c = 0; c < C && La > 0; ++c) {
      int64_t real = 0;
      for (int64_t j = 0; j < Lv; ++j) real += pp[c * Lv + j] ? 0 : 1;
      TORCH_CHECK_VALUE(real > 0, "chunk_attention_cpu: chunk ", c, " has no real key (every key is padding)");
    }
  }
  at::Tensor out = at::empty({C, La, E}, q.options().dtype(at::kFloat));
  if (C * La == 0) return out;
  simd::ChunkAttentionProblem p{q.const_data_ptr(),
                                k.const_data_ptr(),
                                v.const_data_ptr(),
                                elem_of(dtype),
                                out.data_ptr<float>(),
                                q.stride(0),
                                q.stride(1),
                                k.stride(0),
                                k.stride(1),
                                out.stride(0),
                                out.stride(1),
                                pad.defined() ? reinterpret_cast<const uint8_t*>(pad.const_data_ptr<bool>()) : nullptr,
                                C,
                                La,
                                Lv,
                                num_heads,
                                hd,
                                static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)))};
  const int64_t scratch = simd::chunk_attention_scratch(p);
  at::parallel_for(0, C * num_heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(static_cast<size_t>(scratch));
    kernel(p, i0, i1, buf.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnisift, m) {
  m.def("chunk_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor? key_padding, int num_heads) -> Tensor");
  m.def("chunk_attention_cpu_available() -> bool", &chunk_attention_cpu_available);
}

TORCH_LIBRARY_IMPL(omnisift, CPU, m) { m.impl("chunk_attention_cpu", &chunk_attention_cpu); }

}  // namespace omnisift
