// Inner loops of the CPU kernels, compiled once per instruction set (no torch headers here).
//
// csrc/cpu_simd_impl.h holds the loops as templates over a vector policy; cpu_simd_base.cpp,
// cpu_simd_avx2.cpp and cpu_simd_avx512.cpp instantiate them with the portable policy, AVX2+FMA and
// AVX-512 (each TU is compiled with its own -m flags, so nothing outside it may use those
// instructions). cpu_loops() (cpu_dispatch.cpp) picks one table at run time from the CPU's features.
#pragma once

#include <cstdint>

namespace omnisift {
namespace simd {

enum class Elem : int { F32 = 0, BF16 = 1, F16 = 2 };

// One call of the fused video scores (see video_scores_cpu.cpp for the op's contract).
//
// Work is split into units: unit u is segment unit_seg[u] ("A"), and, when unit_fused[u] != 0, also
// segment unit_seg[u] + 1 ("B"), which has A's size, no saliency token and pairs its i-th token with
// A's i-th token. Pass 1 reads A and B side by side (B's temporal dots, A's sum and norms), pass 2
// reads A again, mostly from cache, for the dots with A's mean.
struct VideoScoresProblem {
  const void* x;   // [B, L, D] embeddings, element type `elem`, strides below (in elements)
  Elem elem;
  int64_t L, D, stride_b, stride_l, stride_d;
  const int64_t* token_index;  // [N] flat b*L + l
  const int64_t* seg_offsets;  // [S+1]
  const int64_t* pair_index;   // [N], < 0: saliency (cosine with the segment's mean)
  const int64_t* unit_seg;     // [U]
  const uint8_t* unit_fused;   // [U]
  const uint8_t* unit_needs_mean;  // [U]: fused, or some token of the segment has pair_index < 0
  int64_t max_segment;         // largest segment size
  bool check_finite;           // flag rows holding NaN/Inf in *nonfinite_token
  int64_t* nonfinite_token;    // -1, or (when check_finite) the flat index of some non-finite row
  float* out;                  // [N]
  // Optional: called after each unit with its first segment and segment count (1 or 2), from the
  // thread that scored it (the pruning selection and the gather of the survivors run there).
  void (*after_unit)(void* ctx, int64_t first_segment, int64_t num_segments);
  void* after_unit_ctx;
};

// Per-thread scratch: sum [D] and acc [3 * max_segment] (fp64), row_a and row_b [D] (fp32, strided rows).
struct VideoScoresScratch {
  double* sum;
  float* row_a;
  float* row_b;
  double* acc;
};

// One call of the selector's chunk attention (see chunk_attention_cpu.cpp for the op's contract): for
// chunk c and head h, query i attends to every key j of the same chunk that is not padding:
//   out[c, i, h] = sum_j softmax_j(scale * <q[c, i, h], k[c, j, h]>) v[c, j, h]
// where x[c, i, h] is the head_dim-wide slice starting at element h * head_dim of row i of chunk c.
// Computed in fp32 (inputs of elem type widened exactly); strides in elements. Work items are (chunk, head)
// pairs, item = c * num_heads + h.
struct ChunkAttentionProblem {
  const void* q;  // [C, La, num_heads * head_dim] through q_chunk / q_row, element type elem
  const void* k;  // [C, Lv, ...] through kv_chunk / kv_row (keys and values may share rows), elem
  const void* v;
  Elem elem;      // of q, k and v (fp32, bf16 or fp16; read as fp32, exactly)
  float* out;     // fp32 [C, La, num_heads * head_dim] through out_chunk / out_row
  int64_t q_chunk, q_row, kv_chunk, kv_row, out_chunk, out_row;
  const uint8_t* key_padding;  // [C, Lv] contiguous, nonzero = padding (ignored), or nullptr
  int64_t num_chunks, num_queries, num_keys, num_heads, head_dim;
  float scale;
};

struct Loops {
  const char* isa;
  // Scores of units [u0, u1), each unit on the calling thread.
  void (*video_scores_units)(const VideoScoresProblem& p, int64_t u0, int64_t u1, VideoScoresScratch& s);
  // One unit split over threads: pass 1 over positions [i0, i1) adds the A rows into S (a per-thread
  // partial sum) and fills acc [3 * n] (disjoint ranges); after the caller turns the summed partials
  // into the mean, pass 2 over [i0, i1) writes the scores (mm = |mean|^2).
  void (*unit_pass1)(const VideoScoresProblem& p, int64_t u, int64_t i0, int64_t i1, double* S, double* acc,
                     float* row_a, float* row_b);
  void (*unit_pass2)(const VideoScoresProblem& p, int64_t u, int64_t i0, int64_t i1, const double* mean, double mm,
                     const double* acc, float* row_a, float* row_b);
  // True when none of x[0:n] (contiguous, element type elem) is NaN or +-Inf.
  bool (*all_finite)(const void* x, Elem elem, int64_t n);
  // The same for n elements spaced by `stride` elements.
  bool (*all_finite_strided)(const void* x, Elem elem, int64_t n, int64_t stride);
  // Chunk attention of items [item0, item1) on the calling thread, with chunk_attention_scratch(p)
  // floats of scratch; nullptr where this instruction set has no kernel for it (AVX-512 only).
  void (*chunk_attention)(const ChunkAttentionProblem& p, int64_t item0, int64_t item1, float* scratch);
};

// Scratch floats one thread needs for chunk_attention: the packed query tile and the score tile.
inline int64_t chunk_attention_scratch(const ChunkAttentionProblem& p) {
  return p.head_dim * 64 + p.num_keys * 64 + 64;
}

// nullptr when the compiler could not build that instruction set.
const Loops* loops_base();
const Loops* loops_avx2();
const Loops* loops_avx512();

}  // namespace simd
}  // namespace omnisift
