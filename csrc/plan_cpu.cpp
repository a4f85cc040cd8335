// The frame/chunk plan of a batch on the CPU (the op `omnisift::build_plan_cpu`; its CSR token lists
// are the op `omnisift::index_plan_cpu`, index_plan_cpu.cpp): the same tensors as
// omnisift_kernels/plan.py:_build_plan_torch, computed in a few sequential passes over the B*L tokens
// instead of ~60 tensor ops (each a dispatch and a parallel region, whose fixed costs outweigh the
// little work each op does at these sizes).
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
//
// build_plan_cpu runs the steps below in order, each one pass over the tokens, the frames, the chunk
// slots or the rows: scan_tokens, pair_frames_into_chunks, chunk_keys, assign_audio_to_chunks,
// keep_chunk_audio, row_totals, then the sizes.
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

// The inputs, checked, as contiguous int64 ids and time ids and bool validity (the tensors keep the
// converted copies alive).
struct PlanInputs {
  int64_t B, L, BL;
  at::Tensor ids_tensor, time_tensor, valid_tensor;
  const int64_t* ids;
  const int64_t* time;
  const bool* valid;
};

PlanInputs check_plan_inputs(const at::Tensor& input_ids, const at::Tensor& time_ids, const at::Tensor& valid) {
  TORCH_CHECK_VALUE(input_ids.dim() == 2 && time_ids.sizes() == input_ids.sizes() &&
                        valid.sizes() == input_ids.sizes(),
                    "build_plan_cpu: input_ids, time_ids and valid must be [B, L] alike, got ", input_ids.sizes(),
                    ", ", time_ids.sizes(), ", ", valid.sizes());
  TORCH_CHECK_TYPE(valid.scalar_type() == at::kBool, "build_plan_cpu: valid must be bool, got ", valid.scalar_type());
  TORCH_CHECK_VALUE(input_ids.device().is_cpu() && time_ids.device().is_cpu() && valid.device().is_cpu(),
                    "build_plan_cpu: expects CPU tensors");
  PlanInputs in;
  in.B = input_ids.size(0);
  in.L = input_ids.size(1);
  in.BL = in.B * in.L;
  in.ids_tensor = input_ids.to(at::kLong).contiguous();
  in.time_tensor = time_ids.to(at::kLong).contiguous();
  in.valid_tensor = valid.contiguous();
  in.ids = in.ids_tensor.const_data_ptr<int64_t>();
  in.time = in.time_tensor.const_data_ptr<int64_t>();
  in.valid = in.valid_tensor.const_data_ptr<bool>();
  return in;
}

// The op's outputs, in the order it returns them: per token, per frame slot and per chunk slot [BL],
// per row [B]. The zero-filled ones are counters, or keep zeros past the F frames / C chunks as the
// tensor version does.
struct PlanOutputs {
  at::Tensor is_video, is_audio, keep_base, frame_id, audio_chunk, frame_len, frame_drop, frame_chunk,
      frame_is_paired, chunk_audio, chunk_video_kept, chunk_audio_keep, chunk_scored, video_total, video_kept,
      audio_total, audio_kept, kept, sizes;

  std::vector<at::Tensor> list() const {
    return {is_video, is_audio, keep_base, frame_id, audio_chunk, frame_len, frame_drop, frame_chunk,
            frame_is_paired, chunk_audio, chunk_video_kept, chunk_audio_keep, chunk_scored, video_total,
            video_kept, audio_total, audio_kept, kept, sizes};
  }
};

PlanOutputs allocate_plan_outputs(int64_t B, int64_t BL) {
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const auto b8 = at::TensorOptions().dtype(at::kBool);
  PlanOutputs o;
  o.is_video = at::empty({BL}, b8);
  o.is_audio = at::empty({BL}, b8);
  o.keep_base = at::empty({BL}, b8);
  o.frame_id = at::empty({BL}, i64);
  o.audio_chunk = at::empty({BL}, i64);
  o.frame_len = at::zeros({BL}, i64);
  o.frame_drop = at::zeros({BL}, i64);
  o.frame_chunk = at::empty({BL}, i64);
  o.frame_is_paired = at::zeros({BL}, b8);
  o.chunk_audio = at::zeros({BL}, i64);
  o.chunk_video_kept = at::zeros({BL}, i64);
  o.chunk_audio_keep = at::zeros({BL}, i64);
  o.chunk_scored = at::zeros({BL}, b8);
  o.video_total = at::zeros({B}, i64);
  o.video_kept = at::empty({B}, i64);
  o.audio_total = at::zeros({B}, i64);
  o.audio_kept = at::empty({B}, i64);
  o.kept = at::empty({B}, i64);
  o.sizes = at::empty({10}, i64);
  return o;
}

// What the token scan finds besides the per-token buffers.
struct TokenScan {
  std::vector<int64_t> frame_first;     // [F] flat index of each frame's first token
  std::vector<int64_t> frames_per_row;  // [B]
  std::vector<int64_t> valid_per_row;   // [B]
  int64_t num_video = 0, num_audio = 0;
};

// One pass over the tokens: video/audio flags and keep_base, frame starts (a video token whose time id
// differs from the previous video token of its row), the running frame id and the frames' lengths,
// per-row counts (video_total, audio_total, valid and frame counts).
TokenScan scan_tokens(const PlanInputs& in, int64_t video_token_id, int64_t audio_token_id, PlanOutputs& out) {
  const int64_t B = in.B, L = in.L;
  const int64_t* idp = in.ids;
  const int64_t* tp = in.time;
  const bool* vp = in.valid;
  bool* isv = out.is_video.data_ptr<bool>();
  bool* isa = out.is_audio.data_ptr<bool>();
  bool* kb = out.keep_base.data_ptr<bool>();
  int64_t* fid = out.frame_id.data_ptr<int64_t>();
  int64_t* flen = out.frame_len.data_ptr<int64_t>();
  int64_t* vtot = out.video_total.data_ptr<int64_t>();
  int64_t* atot = out.audio_total.data_ptr<int64_t>();
  TokenScan scan;
  std::vector<int64_t>& frame_first = scan.frame_first;
  scan.frames_per_row.assign(static_cast<size_t>(B), 0);
  scan.valid_per_row.assign(static_cast<size_t>(B), 0);
  for (int64_t r = 0; r < B; ++r) {
    int64_t prev_video = -1;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i = r * L + l;
      const bool ok = vp[i];
      const bool v = ok && idp[i] == video_token_id, a = ok && idp[i] == audio_token_id;
      isv[i] = v;
      isa[i] = a;
      kb[i] = ok && !v && !a;
      scan.valid_per_row[r] += ok;
      if (v && (prev_video < 0 || tp[r * L + prev_video] != tp[i])) {
        frame_first.push_back(i);
        ++scan.frames_per_row[r];
      }
      if (v) {
        prev_video = l;
        ++vtot[r];
        ++flen[static_cast<int64_t>(frame_first.size()) - 1];
      }
      atot[r] += a;
      fid[i] = static_cast<int64_t>(frame_first.size()) - 1;
    }
    scan.num_video += vtot[r];
    scan.num_audio += atot[r];
  }
  return scan;
}

// What pairing the frames into chunks finds besides the per-frame and per-chunk buffers.
struct ChunkScan {
  std::vector<int64_t> frame_row;          // [F] the row of each frame
  std::vector<int64_t> chunk_first_frame;  // [C] the first frame of each chunk
  std::vector<int64_t> video_dropped;      // [B] video tokens each row drops
};

// One pass over the frame slots: each row's frames in pairs (its 1st and 2nd frame form a chunk, the
// 3rd and 4th the next, ...); a second frame of its first frame's length is paired with it; the first
// frame and a paired second frame drop floor(first frame's length * rho_video) tokens, an unpaired
// second frame none. Writes frame_chunk, frame_is_paired, frame_drop and chunk_video_kept.
ChunkScan pair_frames_into_chunks(const TokenScan& tokens, int64_t B, int64_t BL, double rho_video,
                                  PlanOutputs& out) {
  const int64_t F = static_cast<int64_t>(tokens.frame_first.size());
  const int64_t* flen = out.frame_len.const_data_ptr<int64_t>();
  int64_t* fdrop = out.frame_drop.data_ptr<int64_t>();
  int64_t* fch = out.frame_chunk.data_ptr<int64_t>();
  bool* fpair = out.frame_is_paired.data_ptr<bool>();
  int64_t* cvk = out.chunk_video_kept.data_ptr<int64_t>();
  ChunkScan cs;
  cs.frame_row.resize(static_cast<size_t>(F));
  {
    int64_t f = 0;
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t k = 0; k < tokens.frames_per_row[r]; ++k, ++f) cs.frame_row[f] = r;
    }
  }
  std::vector<int64_t> row_first_frame(static_cast<size_t>(B), 0);
  for (int64_t r = 1; r < B; ++r) row_first_frame[r] = row_first_frame[r - 1] + tokens.frames_per_row[r - 1];
  cs.video_dropped.assign(static_cast<size_t>(B), 0);
  int64_t chunk = -1;
  for (int64_t f = 0; f < BL; ++f) {
    if (f >= F) {  // the tensor version's fills: frame_in_row 1 -> not first, not second
      fch[f] = chunk;
      continue;
    }
    const bool first = (f - row_first_frame[cs.frame_row[f]]) % 2 == 0;
    if (first) {
      ++chunk;
      cs.chunk_first_frame.push_back(f);
    }
    fch[f] = chunk;
    const int64_t first_len = first ? flen[f] : flen[f - 1];
    const bool paired = !first && flen[f] == first_len;
    fpair[f] = paired;
    fdrop[f] = (first || paired) ? floor_times(first_len, rho_video) : 0;
    cs.video_dropped[cs.frame_row[f]] += fdrop[f];
    cvk[chunk] += flen[f] - fdrop[f];
  }
  return cs;
}

// The search keys of the chunk slots, for assigning audio tokens to chunks.
struct ChunkKeys {
  std::vector<int64_t> key;  // [BL] (row << 40) | first frame's time id; INT64_MAX past the C chunks
  std::vector<int64_t> row;  // [max(BL, 1)] the chunk's row; past C the row of the first frame
};

// One pass over the chunks. The row of the slots past C is frame_row[chunk_first = 0] (the tensor
// version's fill): the row of the first frame, or row 0 without frames.
ChunkKeys chunk_keys(const PlanInputs& in, const TokenScan& tokens, const ChunkScan& chunks) {
  const int64_t BL = in.BL;
  const int64_t F = static_cast<int64_t>(tokens.frame_first.size());
  const int64_t C = static_cast<int64_t>(chunks.chunk_first_frame.size());
  const int64_t tail_row = F > 0 ? tokens.frame_first[0] / in.L : 0;
  ChunkKeys ck;
  ck.key.assign(static_cast<size_t>(BL), std::numeric_limits<int64_t>::max());
  ck.row.assign(static_cast<size_t>(std::max<int64_t>(BL, 1)), tail_row);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t ff = tokens.frame_first[chunks.chunk_first_frame[c]];
    ck.row[c] = chunks.frame_row[chunks.chunk_first_frame[c]];
    ck.key[c] = (ck.row[c] << ROW_SHIFT) | in.time[ff];
  }
  return ck;
}

// One pass over the tokens: an audio token goes to the last chunk whose key is <= the token's key
// (upper bound - 1), if that chunk is in the token's row; else audio_chunk = BL (outside every window).
// Writes audio_chunk and the chunk_audio counts; returns how many audio tokens found a chunk.
int64_t assign_audio_to_chunks(const PlanInputs& in, const ChunkKeys& chunk, PlanOutputs& out) {
  const int64_t BL = in.BL, L = in.L;
  const int64_t* tp = in.time;
  const bool* isa = out.is_audio.const_data_ptr<bool>();
  int64_t* ach = out.audio_chunk.data_ptr<int64_t>();
  int64_t* caud = out.chunk_audio.data_ptr<int64_t>();
  int64_t assigned = 0;
  for (int64_t i = 0; i < BL; ++i) {
    ach[i] = BL;
    if (!isa[i]) continue;
    const int64_t r = i / L;
    const int64_t key = (r << ROW_SHIFT) | tp[i];
    const int64_t cand = static_cast<int64_t>(std::upper_bound(chunk.key.begin(), chunk.key.end(), key) -
                                              chunk.key.begin()) - 1;
    if (cand >= 0 && chunk.row[cand] == r) {
      ach[i] = cand;
      ++caud[cand];
      ++assigned;
    }
  }
  return assigned;
}

// What deciding the chunks' audio keeps finds besides chunk_scored and chunk_audio_keep.
struct ChunkAudioKeep {
  std::vector<int64_t> audio_dropped;  // [B] audio tokens each row drops
  int64_t max_chunk_audio = 0, max_chunk_video = 0;
};

// One pass over the chunk slots: a chunk's audio is scored (score_audio, at least 2 audio tokens and a
// kept video token) and then keeps all but floor(n * rho_audio) of its n tokens; an unscored chunk
// keeps them all. Also the largest audio count and kept-video count of a chunk.
ChunkAudioKeep keep_chunk_audio(int64_t B, int64_t BL, int64_t C, const ChunkKeys& chunk, double rho_audio,
                                bool score_audio, PlanOutputs& out) {
  const int64_t* caud = out.chunk_audio.const_data_ptr<int64_t>();
  const int64_t* cvk = out.chunk_video_kept.const_data_ptr<int64_t>();
  int64_t* cak = out.chunk_audio_keep.data_ptr<int64_t>();
  bool* csc = out.chunk_scored.data_ptr<bool>();
  ChunkAudioKeep res;
  res.audio_dropped.assign(static_cast<size_t>(B), 0);
  int64_t max_chunk_audio = 0, max_chunk_video = 0;
  for (int64_t c = 0; c < BL; ++c) {
    max_chunk_audio = std::max(max_chunk_audio, caud[c]);
    max_chunk_video = std::max(max_chunk_video, cvk[c]);
    const bool scored = c < C && caud[c] >= 2 && cvk[c] >= 1 && score_audio;
    csc[c] = scored;
    cak[c] = scored ? caud[c] - floor_times(caud[c], rho_audio) : caud[c];
    if (c < C) res.audio_dropped[chunk.row[c]] += caud[c] - cak[c];
  }
  res.max_chunk_audio = max_chunk_audio;
  res.max_chunk_video = max_chunk_video;
  return res;
}

struct RowTotals {
  int64_t video_kept = 0, kept = 0, max_kept = 0;  // over the batch; max_kept: the longest row
};

// One pass over the rows: video_kept, audio_kept and kept of each row, and their totals.
RowTotals row_totals(const TokenScan& tokens, const ChunkScan& chunks, const ChunkAudioKeep& audio, int64_t B,
                     PlanOutputs& out) {
  const int64_t* vtot = out.video_total.const_data_ptr<int64_t>();
  const int64_t* atot = out.audio_total.const_data_ptr<int64_t>();
  int64_t* vkept = out.video_kept.data_ptr<int64_t>();
  int64_t* akept = out.audio_kept.data_ptr<int64_t>();
  int64_t* kp = out.kept.data_ptr<int64_t>();
  RowTotals t;
  for (int64_t r = 0; r < B; ++r) {
    vkept[r] = vtot[r] - chunks.video_dropped[r];
    akept[r] = atot[r] - audio.audio_dropped[r];
    kp[r] = tokens.valid_per_row[r] - chunks.video_dropped[r] - audio.audio_dropped[r];
    t.video_kept += vkept[r];
    t.kept += kp[r];
    t.max_kept = std::max(t.max_kept, kp[r]);
  }
  return t;
}

std::vector<at::Tensor> build_plan_cpu(const at::Tensor& input_ids, const at::Tensor& time_ids,
                                       const at::Tensor& valid, int64_t video_token_id, int64_t audio_token_id,
                                       double rho_video, double rho_audio, bool score_audio) {
  const PlanInputs in = check_plan_inputs(input_ids, time_ids, valid);
  PlanOutputs out = allocate_plan_outputs(in.B, in.BL);
  const TokenScan tokens = scan_tokens(in, video_token_id, audio_token_id, out);
  const ChunkScan chunks = pair_frames_into_chunks(tokens, in.B, in.BL, rho_video, out);
  const ChunkKeys keys = chunk_keys(in, tokens, chunks);
  const int64_t assigned = assign_audio_to_chunks(in, keys, out);
  const int64_t F = static_cast<int64_t>(tokens.frame_first.size());
  const int64_t C = static_cast<int64_t>(chunks.chunk_first_frame.size());
  const ChunkAudioKeep audio = keep_chunk_audio(in.B, in.BL, C, keys, rho_audio, score_audio, out);
  const RowTotals totals = row_totals(tokens, chunks, audio, in.B, out);
  // sizes: Nv, Na, F, C, video tokens kept, audio tokens in a chunk, tokens kept, the longest row kept,
  // the most audio tokens and the most kept video tokens of a chunk.
  const int64_t sizes[10] = {tokens.num_video, tokens.num_audio, F, C, totals.video_kept, assigned,
                             totals.kept, totals.max_kept, audio.max_chunk_audio, audio.max_chunk_video};
  std::copy(sizes, sizes + 10, out.sizes.data_ptr<int64_t>());
  return out.list();
}

}  // namespace
}  // namespace omnisift

TORCH_LIBRARY_FRAGMENT(omnisift, m) {
  m.def("build_plan_cpu(Tensor input_ids, Tensor time_ids, Tensor valid, int video_token_id, int audio_token_id, "
        "float rho_video, float rho_audio, bool score_audio) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(omnisift, CPU, m) { m.impl("build_plan_cpu", &omnisift::build_plan_cpu); }
