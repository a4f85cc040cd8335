"""vLLM's Qwen2.5-Omni thinker with OmniSIFT compression between the encoders and the decoder.

:class:`OmniSIFTQwen2_5OmniThinker` subclasses vLLM's ``Qwen2_5OmniThinkerForConditionalGeneration``
and changes four steps (the rest, the decoder included, is vLLM's):

- ``embed_multimodal``: a video's patches go through the vision tower (and, with its sound track, the
  track through the audio tower), then this library's compressor keeps OmniSIFT's tokens. The output
  holds the kept embeddings in prompt order plus 9 channels with each kept token's position relative
  to its span (:mod:`.positions`); a track's own audio item yields nothing (its tokens came with the
  video). Images and standalone audio are encoded as vLLM does and never pruned.
- ``get_mrope_input_positions``: transformers' TMRoPE ids of the uncompressed prompt, taken at the kept
  tokens (kept tokens keep their original ids, spec §6).
- ``embed_input_ids``: strips the position channels, merges the embeddings in prompt order, and
  remembers the relative positions of the merged tokens;
- ``forward``: adds them to the position ids of those tokens (in place, in the runner's position
  buffer, without a host synchronisation) before vLLM's decoder runs.

The relative positions ride with the embeddings through vLLM's encoder cache, so chunked prefill,
prefix caching and batches of different requests see the same ids. The selector's parameters load
from ``thinker.compressor.*`` of the checkpoint, as the authors' release names them.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniThinkerProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...layout import Video
from ...modules import OmniSIFTCompressor
from ...selector import VisionGuidedAudioSelector
from .config import serving_config
from .positions import POSITION_CHANNELS, _RopeIndex, compressed_positions, decode_positions, encode_positions
from .positions import item_relative_positions
from .processor import (
    PAIRED, TRACK_FEATURES, TRACK_LENGTHS, OmniSIFTQwen2_5OmniProcessor, audio_tokens_from_mel, track_span_ids,
)

COMPRESSOR_PREFIX = "compressor."  # thinker.compressor.* after vLLM's "thinker." -> "" mapping


def _value(item: Any, key: str) -> Any:
    elem = item.get(key) if item is not None else None
    return None if elem is None else elem.data


@MULTIMODAL_REGISTRY.register_processor(
    OmniSIFTQwen2_5OmniProcessor,
    info=Qwen2_5OmniThinkerProcessingInfo,
    dummy_inputs=Qwen2_5OmniThinkerDummyInputsBuilder,
)
class OmniSIFTQwen2_5OmniThinker(Qwen2_5OmniThinkerForConditionalGeneration):
    """vLLM's Qwen2.5-Omni thinker serving the OmniSIFT-compressed sequence (see the module docstring).

    Settings come from ``hf_overrides`` or the checkpoint config (:mod:`.config`); without them a local
    checkpoint with selector weights is compressed at the release's ratios, any other is served as
    vLLM serves it (this class then only delegates).
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.omnisift = serving_config(vllm_config.model_config.hf_config, vllm_config.model_config.model)
        self._pending_positions: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.omnisift.enabled:
            return
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("omnisift vLLM plugin: pipeline parallelism is not supported (the kept tokens' "
                             "positions are set on the first stage only); use tensor parallelism")
        d_model = self.config.text_config.hidden_size
        self.compressor = VisionGuidedAudioSelector(d_model)
        object.__setattr__(self, "_omnisift_compressor", OmniSIFTCompressor(
            d_model, rho_video=self.omnisift.rho_video, rho_audio=self.omnisift.rho_audio,
            selector=self.compressor, backend="auto"))
        self._rope = _RopeIndex(self.config)

    # --- weights --------------------------------------------------------------------------------
    def load_weights(self, weights):
        if not self.omnisift.enabled:
            return super().load_weights((n, w) for n, w in weights if not n.startswith("thinker.compressor."))
        loaded = super().load_weights(weights)
        expected = {COMPRESSOR_PREFIX + n for n, _ in self.compressor.named_parameters()}
        missing = sorted(expected - set(loaded))
        if missing and self.omnisift.rho_audio > 0:
            raise ValueError(
                f"omnisift vLLM plugin: the checkpoint has no selector weights (thinker.compressor.*: missing "
                f"{missing[:3]}{'...' if len(missing) > 3 else ''}) but rho_audio={self.omnisift.rho_audio} "
                "needs them; save them with the model (OmniSIFTThinker keeps them at thinker.compressor.*) or "
                "serve with rho_audio=0")
        # rho_audio = 0 never calls the selector: its (random) parameters count as loaded.
        return set(loaded) | expected

    # --- encoders + compression -----------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        if not self.omnisift.enabled:
            return super().embed_multimodal(**kwargs)
        paired = kwargs.pop(PAIRED, None)
        track_features = kwargs.pop(TRACK_FEATURES, None)
        track_lengths = kwargs.pop(TRACK_LENGTHS, None)
        if kwargs.get("pixel_values_videos") is not None:
            return self._embed_videos(kwargs, track_features, track_lengths)
        if kwargs.get("video_embeds") is not None:
            raise ValueError("omnisift vLLM plugin: precomputed video_embeds cannot be compressed (the plugin "
                             "needs the video's patches); pass the video itself")
        if kwargs.get("input_audio_features") is not None and paired is not None:
            flags = torch.as_tensor(paired).flatten().bool()
            if bool(flags.all()):
                # The sound track of a video: its kept tokens are part of the video item's output.
                width = self.config.text_config.hidden_size
                empty = torch.empty(0, width, dtype=self.visual.dtype, device=self.visual.device)
                return tuple(empty for _ in range(flags.numel()))
        return super().embed_multimodal(**kwargs)

    def _embed_videos(self, kwargs: dict, track_features, track_lengths) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        video_input = self._parse_and_validate_video_input(**kwargs)
        video_embeds = self._process_video_input(video_input)
        grids = video_input["video_grid_thw"].tolist()
        n = len(grids)
        spg = kwargs.get("second_per_grid_ts")
        spgs = [float(x) for x in torch.as_tensor(spg).flatten().tolist()] if spg is not None else [1.0] * n
        tracks: list[torch.Tensor | None] = [None] * n
        mel: list[int | None] = [None] * n
        if track_features is not None:
            lengths = torch.as_tensor(track_lengths).flatten()
            frames = torch.arange(int(lengths.max()) if lengths.numel() else 0)
            audio_input = self._parse_and_validate_audio_input(
                input_audio_features=track_features, audio_feature_lengths=lengths,
                feature_attention_mask=(frames[None] < lengths[:, None]).long())
            tracks = list(self._process_audio_input(audio_input))
            mel = [int(x) for x in torch.as_tensor(track_lengths).flatten().tolist()]
        merge = cfg.vision_config.spatial_merge_size
        v_id, a_id = cfg.video_token_index, cfg.audio_token_index
        rows, grid = [], []
        for i in range(n):
            t, h, w = (int(x) for x in grids[i])
            if mel[i] is not None:
                inner = track_span_ids(cfg, grids[i], spgs[i], audio_tokens_from_mel(mel[i]))[1:-1]
            else:
                inner = [v_id] * (t * h * w // merge ** 2)
            rel = item_relative_positions(self._rope, inner, grid_thw=grids[i], second_per_grid=spgs[i],
                                          audio_seqlen=mel[i])
            rows.append((inner, rel))
            n_audio = int(tracks[i].shape[0]) if tracks[i] is not None else 0
            grid.append([Video(t, h // merge, w // merge, audio_tokens=n_audio, second_per_grid=spgs[i])])
        return self._compress_rows(rows, grid, video_embeds, tracks, v_id, a_id)

    def _compress_rows(self, rows, grid, video_embeds, tracks, v_id: int, a_id: int) -> tuple[torch.Tensor, ...]:
        """Compresses every video's span in one call; per video its kept embeddings + position channels.

        Each video is one row ``<|vision_bos|>[<|audio_bos|>] span [<|audio_eos|>]<|vision_eos|>`` with the
        item's own TMRoPE ids (bos at 0, media from 1), so chunks are those of the full prompt. The
        layout (``grid``) gives every size on the host: no device-to-host read.
        """
        from ...plan import sizes_from_grid

        cfg = self.config
        dev, dtype, d_model = video_embeds[0].device, video_embeds[0].dtype, video_embeds[0].shape[-1]
        B = len(rows)
        L = max(len(inner) for inner, _ in rows) + 4
        ids = torch.zeros(B, L, dtype=torch.long)
        pos = torch.zeros(3, B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        heads = []
        for b, (inner, rel) in enumerate(rows):
            with_audio = tracks[b] is not None
            head = [cfg.vision_start_token_id] + ([cfg.audio_start_token_id] if with_audio else [])
            tail = ([cfg.audio_end_token_id] if with_audio else []) + [cfg.vision_end_token_id]
            row = head + list(inner) + tail
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
            pos[:, b, len(head): len(head) + len(inner)] = rel + 1
            pos[:, b, len(head) + len(inner): len(row)] = (int(rel.max()) + 2) if rel.numel() else 1
            heads.append((len(head), len(tail)))
        _, kept_rows = sizes_from_grid(grid, rho_video=self.omnisift.rho_video, rho_audio=self.omnisift.rho_audio,
                                       score_audio=True)
        counts, media_index, start = [], [], 0
        for (h, t), k in zip(heads, kept_rows):
            counts.append(k - h - t)
            media_index.extend(range(start + h, start + k - t))
            start += k
        is_v = (ids == v_id).to(dev)
        is_a = (ids == a_id).to(dev)
        ids, pos, mask = ids.to(dev), pos.to(dev), mask.to(dev)
        embeds = torch.zeros(B, L, d_model, dtype=dtype, device=dev)
        embeds.masked_scatter_(is_v.unsqueeze(-1), torch.cat(list(video_embeds)).to(dtype))
        if any(t is not None for t in tracks):
            embeds.masked_scatter_(is_a.unsqueeze(-1), torch.cat([t for t in tracks if t is not None]).to(dtype))
        res = self._omnisift_compressor(embeds, ids, pos, mask, video_token_id=v_id, audio_token_id=a_id,
                                        output="packed", grid=grid)
        media = torch.tensor(media_index, dtype=torch.long).to(dev, non_blocking=True)
        kept_rel = (pos - 1).view(3, -1)[:, res.indices.index_select(0, media)]
        kept = res.inputs_embeds.index_select(0, media)
        out = torch.cat([kept, encode_positions(kept_rel, kept.dtype)], dim=-1)
        return tuple(out.split(counts))

    # --- positions ------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        if not self.omnisift.enabled:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        cfg = self.config
        merge = cfg.vision_config.spatial_merge_size
        spans = []
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            data, off, length = f.data, f.mm_position.offset, f.mm_position.length
            if f.modality == "audio":
                is_paired = _value(data, PAIRED)
                if is_paired is not None and bool(torch.as_tensor(is_paired).flatten()[0]):
                    continue  # a video's sound track: laid out with the video
                spans.append(dict(modality="audio", offset=off, length=length,
                                  original=list(input_tokens[off: off + length]), embed=None,
                                  audio_seqlen=int(torch.as_tensor(_value(data, "audio_feature_lengths")).flatten()[0])))
            elif f.modality == "image":
                spans.append(dict(modality="image", offset=off, length=length,
                                  original=list(input_tokens[off: off + length]), embed=None,
                                  grid_thw=[int(x) for x in _value(data, "image_grid_thw").tolist()]))
            elif f.modality == "video":
                grid = [int(x) for x in _value(data, "video_grid_thw").tolist()]
                spg = _value(data, "second_per_grid_ts")
                spg = float(torch.as_tensor(spg).flatten()[0]) if spg is not None else 1.0
                track = _value(data, TRACK_LENGTHS)
                mel = int(torch.as_tensor(track).flatten()[0]) if track is not None else None
                if mel is not None:
                    original = track_span_ids(cfg, grid, spg, audio_tokens_from_mel(mel))
                    embed = f.mm_position.is_embed
                else:
                    original = [cfg.video_token_index] * (grid[0] * grid[1] * grid[2] // merge ** 2)
                    embed = torch.ones(length, dtype=torch.bool)
                spans.append(dict(modality="video", offset=off, length=length, original=list(original), embed=embed,
                                  grid_thw=grid, second_per_grid=spg, audio_seqlen=mel))
            else:
                raise ValueError(f"omnisift vLLM plugin: unsupported modality {f.modality!r}")
        return compressed_positions(self._rope, input_tokens, spans)

    # --- merge + decoder ------------------------------------------------------------------------
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self._pending_positions = None
        if (not self.omnisift.enabled or multimodal_embeddings is None or is_multimodal is None
                or len(multimodal_embeddings) == 0):
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        d_model = self.config.text_config.hidden_size
        embeds, rels = [], []
        for e in multimodal_embeddings:
            if e.shape[-1] == d_model + POSITION_CHANNELS:
                embeds.append(e[:, :d_model])
                rels.append(decode_positions(e[:, d_model:]))
            else:
                embeds.append(e)
                rels.append(torch.zeros(3, e.shape[0], dtype=torch.long, device=e.device))
        merged = SupportsMultiModal.embed_input_ids(self, input_ids, embeds, is_multimodal=is_multimodal)
        rel = torch.cat(rels, dim=1)
        if bool(rel.numel()):
            self._pending_positions = (is_multimodal, rel)
        return merged

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._pending_positions = self._pending_positions, None
        if pending is not None and inputs_embeds is not None and positions.dim() == 2:
            is_mm, rel = pending
            n = is_mm.shape[0]
            sub = positions[:, :n]
            mask = is_mm.to(sub.device, non_blocking=True).view(1, n).expand(3, n)
            delta = torch.zeros_like(sub).masked_scatter(mask, rel.to(sub.device, sub.dtype))
            sub.add_(delta)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
