// Shared declarations of the variable-length compaction ops (CPU in varlen.cpp, CUDA in varlen_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace omnisift {

// (packed [T, D], indices int64 [T], cu_seqlens int32 [B+1], max_seqlen (-1 when total was given),
//  position_ids_out [K, T] / [T] (empty [0] when absent), labels_out [T] (empty [0] when absent))
using CompactResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt, at::Tensor, at::Tensor>;

// Checks shared by the CPU and CUDA kernels (TORCH_CHECK_VALUE -> Python ValueError).
void check_compact_args(const at::Tensor& x, const at::Tensor& keep,
                        const std::optional<at::Tensor>& position_ids,
                        const std::optional<at::Tensor>& labels, std::optional<int64_t> total);
void check_index_args(const char* op, const at::Tensor& rows, const at::Tensor& indices);

// position_ids as a [K, B, L] view (K = 1 for a [B, L] input).
at::Tensor positions_as_3d(const at::Tensor& position_ids);

}  // namespace omnisift
