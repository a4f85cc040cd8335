// CPU kernel of the plan's CSR token lists (the op `omnisift::index_plan_cpu`), from the buffers of
// build_plan_cpu (plan_cpu.cpp).
//
//   index_plan_cpu(is_video bool [BL], frame_len int64 [>=F], frame_id int64 [BL], frame_is_paired bool [>=F],
//                  is_audio bool [BL], audio_chunk int64 [BL], chunk_audio int64 [>=C], chunk_audio_keep
//                  int64 [>=C], int F, int C, int Nv, int Na, int Na_assigned) -> Tensor[] in this order:
//     video_index [Nv], frame_offsets [F+1], pair_index [Nv], audio_index [Na], audio_chunk [Na],
//     audio_offsets [C+2], audio_keep_count [C+1] (int64)
//
// The stage-3 CSR lists of omnisift_kernels/pipeline.py:index_plan (its tensor-op version is the
// contract) in two passes over the tokens: video tokens ascending with their frames' CSR offsets and
// each paired second-frame token's partner (the token at the same index of the frame before), audio
// tokens grouped by chunk (stable: ascending within a chunk; outside every window last, as chunk C).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace omnisift {
namespace {

std::vector<at::Tensor> index_plan_cpu(const at::Tensor& is_video, const at::Tensor& frame_len,
                                       const at::Tensor& frame_id, const at::Tensor& frame_is_paired,
                                       const at::Tensor& is_audio, const at::Tensor& audio_chunk,
                                       const at::Tensor& chunk_audio, const at::Tensor& chunk_audio_keep, int64_t F,
                                       int64_t C, int64_t Nv, int64_t Na, int64_t Na_assigned) {
  const int64_t BL = is_video.numel();
  TORCH_CHECK_VALUE(is_video.dim() == 1 && is_audio.sizes() == is_video.sizes() &&
                        frame_id.sizes() == is_video.sizes() && audio_chunk.sizes() == is_video.sizes(),
                    "index_plan_cpu: is_video, is_audio, frame_id and audio_chunk must be [BL] alike");
  TORCH_CHECK_VALUE(F >= 0 && C >= 0 && Nv >= 0 && Na >= 0 && Na_assigned >= 0 && Na_assigned <= Na &&
                        frame_len.numel() >= F && frame_is_paired.numel() >= F && chunk_audio.numel() >= C &&
                        chunk_audio_keep.numel() >= C,
                    "index_plan_cpu: sizes F=", F, ", C=", C, ", Nv=", Nv, ", Na=", Na, ", Na_assigned=", Na_assigned,
                    " do not fit the plan buffers");
  for (const auto* t : {&is_video, &frame_is_paired, &is_audio}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kBool, "index_plan_cpu: masks must be bool");
  }
  for (const auto* t : {&frame_len, &frame_id, &audio_chunk, &chunk_audio, &chunk_audio_keep}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, "index_plan_cpu: plan buffers must be int64");
  }
  const at::Tensor isv = is_video.contiguous(), fl = frame_len.contiguous(), fid = frame_id.contiguous();
  const at::Tensor fpair = frame_is_paired.contiguous(), isa = is_audio.contiguous(), ach = audio_chunk.contiguous();
  const at::Tensor ca = chunk_audio.contiguous(), cak = chunk_audio_keep.contiguous();
  const bool* vp = isv.const_data_ptr<bool>();
  const bool* ap = isa.const_data_ptr<bool>();
  const bool* pp = fpair.const_data_ptr<bool>();
  const int64_t* flp = fl.const_data_ptr<int64_t>();
  const int64_t* fidp = fid.const_data_ptr<int64_t>();
  const int64_t* achp = ach.const_data_ptr<int64_t>();
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor video_index = at::empty({Nv}, i64), frame_offsets = at::empty({F + 1}, i64);
  at::Tensor pair_index = at::empty({Nv}, i64), audio_index = at::empty({Na}, i64);
  at::Tensor audio_chunk_out = at::empty({Na}, i64), audio_offsets = at::empty({C + 2}, i64);
  at::Tensor keep_count = at::empty({C + 1}, i64);
  int64_t* vi = video_index.data_ptr<int64_t>();
  int64_t* fo = frame_offsets.data_ptr<int64_t>();
  int64_t* pi = pair_index.data_ptr<int64_t>();
  int64_t* ai = audio_index.data_ptr<int64_t>();
  int64_t* ac = audio_chunk_out.data_ptr<int64_t>();
  int64_t* ao = audio_offsets.data_ptr<int64_t>();
  int64_t* kc = keep_count.data_ptr<int64_t>();
  fo[0] = 0;
  for (int64_t f = 0; f < F; ++f) fo[f + 1] = fo[f] + flp[f];
  // Video tokens ascending (the first Nv, as compact_indices), their partners.
  int64_t n = 0;
  for (int64_t t = 0; t < BL && n < Nv; ++t) {
    if (vp[t]) vi[n++] = t;
  }
  TORCH_CHECK_VALUE(n == Nv, "index_plan_cpu: is_video holds ", n, " tokens, expected Nv=", Nv);
  for (int64_t i = 0; i < Nv; ++i) {
    const int64_t f = fidp[vi[i]];
    TORCH_CHECK_VALUE(f >= 0 && f < F, "index_plan_cpu: frame_id ", f, " of a video token outside [0, F=", F, ")");
    const int64_t within = i - fo[f];
    const int64_t partner = std::min(fo[std::max<int64_t>(f - 1, 0)] + within, std::max<int64_t>(Nv - 1, 0));
    pi[i] = pp[f] ? vi[partner] : -1;
  }
  // Audio tokens grouped by chunk (a stable counting sort; chunks past C count as C).
  std::vector<int64_t> count(static_cast<size_t>(C + 2), 0);
  int64_t m = 0;
  for (int64_t t = 0; t < BL && m < Na; ++t) {
    if (!ap[t]) continue;
    const int64_t c = std::min(achp[t], C);
    TORCH_CHECK_VALUE(c >= 0, "index_plan_cpu: negative audio_chunk ", achp[t]);
    ++count[static_cast<size_t>(c) + 1];
    ++m;
  }
  TORCH_CHECK_VALUE(m == Na, "index_plan_cpu: is_audio holds ", m, " tokens, expected Na=", Na);
  for (int64_t c = 0; c <= C; ++c) count[static_cast<size_t>(c) + 1] += count[static_cast<size_t>(c)];
  m = 0;
  for (int64_t t = 0; t < BL && m < Na; ++t) {
    if (!ap[t]) continue;
    const int64_t c = std::min(achp[t], C);
    const int64_t slot = count[static_cast<size_t>(c)]++;
    ai[slot] = t;
    ac[slot] = c;
    ++m;
  }
  const int64_t* cap = ca.const_data_ptr<int64_t>();
  const int64_t* ckp = cak.const_data_ptr<int64_t>();
  const int64_t outside = Na - Na_assigned;
  ao[0] = 0;
  for (int64_t c = 0; c < C; ++c) {
    ao[c + 1] = ao[c] + cap[c];
    kc[c] = ckp[c];
  }
  ao[C + 1] = ao[C] + outside;
  kc[C] = outside;
  return {video_index, frame_offsets, pair_index, audio_index, audio_chunk_out, audio_offsets, keep_count};
}


}  // namespace
}  // namespace omnisift

TORCH_LIBRARY_FRAGMENT(omnisift, m) {
  m.def("index_plan_cpu(Tensor is_video, Tensor frame_len, Tensor frame_id, Tensor frame_is_paired, "
        "Tensor is_audio, Tensor audio_chunk, Tensor chunk_audio, Tensor chunk_audio_keep, int F, int C, int Nv, "
        "int Na, int Na_assigned) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(omnisift, CPU, m) { m.impl("index_plan_cpu", &omnisift::index_plan_cpu); }
