// The frame/chunk plan of a batch on the CPU (the op `omnisift::build_plan_cpu`, and its CSR token lists:
// `omnisift::index_plan_cpu`, below): the same tensors as
// omnisift_kernels/plan.py:_build_plan_torch, computed in a few sequential passes over the B*L tokens
// instead of ~60 tensor ops (each a dispatch and a parallel region: about 1.5-1.9 ms on a 2-core VM
// for a 20-second clip, against tens of microseconds here).
//
//   build_plan_cpu(input_ids [B, L] int, time_ids [B, L] int, valid [B, L] bool, video_token_id,
//                  audio_token_id, rho_video, rho_audio, score_audio) -> Tensor[] in this order:
//     is_video, is_audio, keep_base (bool [BL]); frame_id, audio_chunk (int64 [BL]); frame_len,
//     frame_drop, frame_chunk (int64 [BL]), frame_is_paired (bool [BL]); chunk_audio,
//     chunk_video_kept, chunk_audio_keep (int64 [BL]), chunk_scored (bool [BL]); video_total,
//     video_kept, audio_total, audio_kept, kept (int64 [B]); sizes (int64 [10]).
//
// Every buffer matches the tensor version element for element, including the entries past the F
// frames / C chunks (the tensor version's fills), and the audio-to-window search is the same upper
// bound over the same (row << 40 | time id) keys, so even time ids that decrease along a row (which
// no processor produces) give the same plan. floor(n * rho) is taken in double, as torch does.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace omnisift {
namespace {

constexpr int ROW_SHIFT = 40;  // as omnisift_kernels/plan.py

int64_t floor_times(int64_t n, double rho) { return static_cast<int64_t>(std::floor(static_cast<double>(n) * rho)); }

std::vector<at::Tensor> build_plan_cpu(const at::Tensor& input_ids, const at::Tensor& time_ids,
                                       const at::Tensor& valid, int64_t video_token_id, int64_t audio_token_id,
                                       double rho_video, double rho_audio, bool score_audio) {
  TORCH_CHECK_VALUE(input_ids.dim() == 2 && time_ids.sizes() == input_ids.sizes() &&
                        valid.sizes() == input_ids.sizes(),
                    "build_plan_cpu: input_ids, time_ids and valid must be [B, L] alike, got ", input_ids.sizes(),
                    ", ", time_ids.sizes(), ", ", valid.sizes());
  TORCH_CHECK_TYPE(valid.scalar_type() == at::kBool, "build_plan_cpu: valid must be bool, got ", valid.scalar_type());
  TORCH_CHECK_VALUE(input_ids.device().is_cpu() && time_ids.device().is_cpu() && valid.device().is_cpu(),
                    "build_plan_cpu: expects CPU tensors");
  const int64_t B = input_ids.size(0), L = input_ids.size(1), BL = B * L;
  const at::Tensor ids = input_ids.to(at::kLong).contiguous();
  const at::Tensor tim = time_ids.to(at::kLong).contiguous();
  const at::Tensor val = valid.contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  const int64_t* tp = tim.const_data_ptr<int64_t>();
  const bool* vp = val.const_data_ptr<bool>();

  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const auto b8 = at::TensorOptions().dtype(at::kBool);
  at::Tensor is_video = at::empty({BL}, b8), is_audio = at::empty({BL}, b8), keep_base = at::empty({BL}, b8);
  at::Tensor frame_id = at::empty({BL}, i64), audio_chunk = at::empty({BL}, i64);
  at::Tensor frame_len = at::zeros({BL}, i64), frame_drop = at::zeros({BL}, i64), frame_chunk = at::empty({BL}, i64);
  at::Tensor frame_is_paired = at::zeros({BL}, b8);
  at::Tensor chunk_audio = at::zeros({BL}, i64), chunk_video_kept = at::zeros({BL}, i64);
  at::Tensor chunk_audio_keep = at::zeros({BL}, i64), chunk_scored = at::zeros({BL}, b8);
  at::Tensor video_total = at::zeros({B}, i64), video_kept = at::empty({B}, i64), audio_total = at::zeros({B}, i64);
  at::Tensor audio_kept = at::empty({B}, i64), kept = at::empty({B}, i64), sizes = at::empty({10}, i64);
  bool* isv = is_video.data_ptr<bool>();
  bool* isa = is_audio.data_ptr<bool>();
  bool* kb = keep_base.data_ptr<bool>();
  int64_t* fid = frame_id.data_ptr<int64_t>();
  int64_t* ach = audio_chunk.data_ptr<int64_t>();
  int64_t* flen = frame_len.data_ptr<int64_t>();
  int64_t* fdrop = frame_drop.data_ptr<int64_t>();
  int64_t* fch = frame_chunk.data_ptr<int64_t>();
  bool* fpair = frame_is_paired.data_ptr<bool>();
  int64_t* caud = chunk_audio.data_ptr<int64_t>();
  int64_t* cvk = chunk_video_kept.data_ptr<int64_t>();
  int64_t* cak = chunk_audio_keep.data_ptr<int64_t>();
  bool* csc = chunk_scored.data_ptr<bool>();
  int64_t* vtot = video_total.data_ptr<int64_t>();
  int64_t* vkept = video_kept.data_ptr<int64_t>();
  int64_t* atot = audio_total.data_ptr<int64_t>();
  int64_t* akept = audio_kept.data_ptr<int64_t>();
  int64_t* kp = kept.data_ptr<int64_t>();

  // Tokens: video/audio flags, frame starts (a video token whose time id differs from the previous
  // video token of its row), the running frame id, per-row counts.
  std::vector<int64_t> frame_first;  // flat index of each frame's first token
  std::vector<int64_t> frames_per_row(static_cast<size_t>(B), 0), valid_per_row(static_cast<size_t>(B), 0);
  int64_t nv = 0, na = 0;
  for (int64_t r = 0; r < B; ++r) {
    int64_t prev_video = -1;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i = r * L + l;
      const bool ok = vp[i];
      const bool v = ok && idp[i] == video_token_id, a = ok && idp[i] == audio_token_id;
      isv[i] = v;
      isa[i] = a;
      kb[i] = ok && !v && !a;
      valid_per_row[r] += ok;
      if (v && (prev_video < 0 || tp[r * L + prev_video] != tp[i])) {
        frame_first.push_back(i);
        ++frames_per_row[r];
      }
      if (v) {
        prev_video = l;
        ++vtot[r];
        ++flen[static_cast<int64_t>(frame_first.size()) - 1];
      }
      atot[r] += a;
      fid[i] = static_cast<int64_t>(frame_first.size()) - 1;
    }
    nv += vtot[r];
    na += atot[r];
  }
  const int64_t F = static_cast<int64_t>(frame_first.size());

  // Frames: first/second of their chunk, pairing, drops; chunks: first frame, row, key.
  std::vector<int64_t> frame_row(static_cast<size_t>(F)), chunk_first_frame;
  {
    int64_t f = 0;
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t k = 0; k < frames_per_row[r]; ++k, ++f) frame_row[f] = r;
    }
  }
  std::vector<int64_t> row_first_frame(static_cast<size_t>(B), 0);
  for (int64_t r = 1; r < B; ++r) row_first_frame[r] = row_first_frame[r - 1] + frames_per_row[r - 1];
  std::vector<int64_t> video_dropped(static_cast<size_t>(B), 0), audio_dropped(static_cast<size_t>(B), 0);
  int64_t chunk = -1;
  for (int64_t f = 0; f < BL; ++f) {
    if (f >= F) {  // the tensor version's fills: frame_in_row 1 -> not first, not second
      fch[f] = chunk;
      continue;
    }
    const bool first = (f - row_first_frame[frame_row[f]]) % 2 == 0;
    if (first) {
      ++chunk;
      chunk_first_frame.push_back(f);
    }
    fch[f] = chunk;
    const int64_t first_len = first ? flen[f] : flen[f - 1];
    const bool paired = !first && flen[f] == first_len;
    fpair[f] = paired;
    fdrop[f] = (first || paired) ? floor_times(first_len, rho_video) : 0;
    video_dropped[frame_row[f]] += fdrop[f];
    cvk[chunk] += flen[f] - fdrop[f];
  }
  const int64_t C = static_cast<int64_t>(chunk_first_frame.size());
  // Chunk keys over all BL slots: (row << 40) | first frame's time id, INT64_MAX past the C chunks;
  // chunk_row of the slots past C is frame_row[chunk_first = 0] (the tensor version's fill).
  const int64_t tail_row = F > 0 ? frame_first[0] / L : 0;
  std::vector<int64_t> chunk_key(static_cast<size_t>(BL), std::numeric_limits<int64_t>::max());
  std::vector<int64_t> chunk_row(static_cast<size_t>(std::max<int64_t>(BL, 1)), tail_row);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t ff = frame_first[chunk_first_frame[c]];
    chunk_row[c] = frame_row[chunk_first_frame[c]];
    chunk_key[c] = (chunk_row[c] << ROW_SHIFT) | tp[ff];
  }

  // Audio -> the last chunk whose key is <= the token's key (upper bound - 1), if in the same row.
  int64_t assigned = 0;
  for (int64_t i = 0; i < BL; ++i) {
    ach[i] = BL;
    if (!isa[i]) continue;
    const int64_t r = i / L;
    const int64_t key = (r << ROW_SHIFT) | tp[i];
    const int64_t cand = static_cast<int64_t>(std::upper_bound(chunk_key.begin(), chunk_key.end(), key) -
                                              chunk_key.begin()) - 1;
    if (cand >= 0 && chunk_row[cand] == r) {
      ach[i] = cand;
      ++caud[cand];
      ++assigned;
    }
  }
  int64_t max_chunk_audio = 0, max_chunk_video = 0;
  for (int64_t c = 0; c < BL; ++c) {
    max_chunk_audio = std::max(max_chunk_audio, caud[c]);
    max_chunk_video = std::max(max_chunk_video, cvk[c]);
    const bool scored = c < C && caud[c] >= 2 && cvk[c] >= 1 && score_audio;
    csc[c] = scored;
    cak[c] = scored ? caud[c] - floor_times(caud[c], rho_audio) : caud[c];
    if (c < C) audio_dropped[chunk_row[c]] += caud[c] - cak[c];
  }
  int64_t video_kept_total = 0, total_kept = 0, max_kept = 0;
  for (int64_t r = 0; r < B; ++r) {
    vkept[r] = vtot[r] - video_dropped[r];
    akept[r] = atot[r] - audio_dropped[r];
    kp[r] = valid_per_row[r] - video_dropped[r] - audio_dropped[r];
    video_kept_total += vkept[r];
    total_kept += kp[r];
    max_kept = std::max(max_kept, kp[r]);
  }
  int64_t* sz = sizes.data_ptr<int64_t>();
  const int64_t host[10] = {nv, na, F, C, video_kept_total, assigned, total_kept, max_kept, max_chunk_audio,
                            max_chunk_video};
  std::copy(host, host + 10, sz);
  return {is_video,       is_audio,         keep_base,   frame_id,    audio_chunk, frame_len,  frame_drop,
          frame_chunk,    frame_is_paired,  chunk_audio, chunk_video_kept, chunk_audio_keep, chunk_scored,
          video_total,    video_kept,       audio_total, audio_kept,  kept,        sizes};
}

// index_plan_cpu(is_video bool [BL], frame_len int64 [>=F], frame_id int64 [BL], frame_is_paired bool [>=F],
//                is_audio bool [BL], audio_chunk int64 [BL], chunk_audio int64 [>=C], chunk_audio_keep
//                int64 [>=C], int F, int C, int Nv, int Na, int Na_assigned) -> Tensor[] in this order:
//   video_index [Nv], frame_offsets [F+1], pair_index [Nv], audio_index [Na], audio_chunk [Na],
//   audio_offsets [C+2], audio_keep_count [C+1] (int64)
// The stage-3 CSR lists of omnisift_kernels/pipeline.py:index_plan (its tensor-op version is the
// contract) in two passes over the tokens: video tokens ascending with their frames' CSR offsets and
// each paired second-frame token's partner (the token at the same index of the frame before), audio
// tokens grouped by chunk (stable: ascending within a chunk; outside every window last, as chunk C).
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
  m.def("build_plan_cpu(Tensor input_ids, Tensor time_ids, Tensor valid, int video_token_id, int audio_token_id, "
        "float rho_video, float rho_audio, bool score_audio) -> Tensor[]");
  m.def("index_plan_cpu(Tensor is_video, Tensor frame_len, Tensor frame_id, Tensor frame_is_paired, "
        "Tensor is_audio, Tensor audio_chunk, Tensor chunk_audio, Tensor chunk_audio_keep, int F, int C, int Nv, "
        "int Na, int Na_assigned) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(omnisift, CPU, m) {
  m.impl("build_plan_cpu", &omnisift::build_plan_cpu);
  m.impl("index_plan_cpu", &omnisift::index_plan_cpu);
}
