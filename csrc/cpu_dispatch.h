// What the CPU kernels share (defined in cpu_dispatch.cpp): the choice of the inner loops' instruction
// set, the inner loops' element type of a dtype, and the ranking rule of the per-segment top-k.
//
// Users: video_scores_cpu.cpp (video_scores_cpu, video_keep_gather_cpu), topk_cpu.cpp
// (segmented_topk_mask_cpu), finite_cpu.cpp (all_finite_cpu), chunk_attention_cpu.cpp
// (chunk_attention_cpu). cpu_dispatch.cpp also registers the two ops that describe the build:
// cpu_kernels_isa() and cpu_parallel_threads(n).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

#include "cpu_simd.h"

namespace omnisift {

// The inner loops this process uses: the best instruction set the CPU has (portable baseline, AVX2 or
// AVX-512), capped by OMNISIFT_CPU_ISA=base|avx2|avx512 / OMNISIFT_CPU_BASELINE=1 (read once, see
// cpu_settings.h); a bad OMNISIFT_CPU_ISA value raises a ValueError here, at the kernel call.
const simd::Loops& cpu_loops();

// The inner loops' element type of a dtype: fp32, bf16, fp16 (a TypeError for any other).
simd::Elem elem_of(c10::ScalarType t);

// order[0:k) = the positions of the k first of sc[0:n) ranked by score descending, NaN first, ties by
// position (0 < k <= n; nothing for k <= 0), in no particular order among themselves. The ranking of
// segmented_topk_mask_cpu, and of the tokens video_keep_gather_cpu drops, so that both select alike.
void first_k_ranked(const float* sc, int64_t n, int64_t k, std::vector<int64_t>& order);

}  // namespace omnisift
