"""Test fixtures for the Qwen2.5-Omni integration: a tiny random thinker and hand-built inputs.

- :func:`tiny_thinker_config` / :func:`tiny_random_thinker`: a tiny random
  ``Qwen2_5OmniThinkerConfig`` / ``Qwen2_5OmniThinkerForConditionalGeneration`` (no weights needed),
  with the special ids of :data:`TINY_IDS` (or a real tokenizer's) and pad id :data:`TINY_PAD_ID`;
- :func:`build_inputs`: processor-like inputs built from the token counting rules, from
  :mod:`omnisift_kernels.synthetic` items (plain text ids drawn from ``[1, TINY_TEXT_VOCAB)``).

Used by the tests, the benchmarks and the programs' ``--tiny-random`` runs. Importing this module does
not import transformers; the functions that build a config or a model do.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import synthetic as syn
from ..integrations.qwen2_5_omni_compat import check_transformers_version

TINY_IDS = dict(
    audio_token_index=120, image_token_index=121, video_token_index=122,
    audio_start_token_id=123, audio_end_token_id=124, vision_start_token_id=125, vision_end_token_id=126,
)
TINY_PAD_ID = 127
TINY_TEXT_VOCAB = 100  # plain text ids are drawn from [1, 100)


def tiny_thinker_config(
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 128,
    *,
    pad_token_id: int | None = None,
    token_ids: dict[str, int] | None = None,
):
    """A tiny random ``Qwen2_5OmniThinkerConfig``.

    Text: ``hidden_size``, ``num_layers`` layers, 4 heads (2 KV), mrope section [2, 1, 1]. Vision: depth 1,
    width 32, patch 14, temporal patch 2, spatial merge 2. Audio: 1 layer, width 32, 128 mel bins.

    Args:
        hidden_size, num_layers: the text model's width and depth.
        vocab_size: the text vocabulary (at least the tokenizer's length when one is used).
        pad_token_id: the text config's pad id (default :data:`TINY_PAD_ID`).
        token_ids: the special ids, keyed as :data:`TINY_IDS` (``audio_token_index``, ``image_token_index``,
            ``video_token_index``, ``audio_start_token_id``, ``audio_end_token_id``,
            ``vision_start_token_id``, ``vision_end_token_id``); missing keys take :data:`TINY_IDS`' values.
            Give a real tokenizer's ids here so the config matches it.
    """
    check_transformers_version()
    from transformers import Qwen2_5OmniThinkerConfig

    ids = dict(TINY_IDS)
    if token_ids:
        unknown = set(token_ids) - set(TINY_IDS)
        if unknown:
            raise ValueError(f"tiny_thinker_config: token_ids keys must be among {sorted(TINY_IDS)}; "
                             f"got unknown {sorted(unknown)}")
        ids.update({k: int(v) for k, v in token_ids.items()})
    pad = TINY_PAD_ID if pad_token_id is None else int(pad_token_id)
    too_big = {k: v for k, v in dict(ids, pad_token_id=pad).items() if not 0 <= v < vocab_size}
    if too_big:
        raise ValueError(f"tiny_thinker_config: ids must be in [0, vocab_size={vocab_size}); got {too_big}")

    heads = 4
    head_dim = hidden_size // heads
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=4096, pad_token_id=pad,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
            fullatt_block_indexes=[0], patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
        ),
        audio_config=dict(
            encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32, output_dim=hidden_size,
            num_mel_bins=128, n_window=100, max_source_positions=1500,
        ),
        **ids,
    )


def tiny_random_thinker(seed: int = 0, **config_kwargs: Any):
    """A tiny random ``Qwen2_5OmniThinkerForConditionalGeneration`` (fp32, eval mode, eager-free sdpa)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config(**config_kwargs))
    model.generation_config.pad_token_id = model.config.get_text_config().pad_token_id
    return model.eval()


def _audio_frames(tokens: int) -> int:
    """Mel frames that give exactly ``tokens`` audio tokens (``((n-1)//2 + 1 - 2)//2 + 1``)."""
    return 4 * tokens


def build_inputs(
    config,
    rows: list[list[Any]],
    *,
    padding_side: str = "right",
    seed: int = 0,
    answer: int = 0,
) -> dict[str, Any]:
    """Processor-like inputs built by hand from the token counting rules (spec facts).

    Args:
        config: the thinker config (ids, patch and merge sizes).
        rows: per row a list of ``synthetic.Text(n)``, ``synthetic.Video(seconds, frame_h, frame_w,
            audio_tokens)`` (grid ``(seconds, 2 frame_h, 2 frame_w)`` at 2 fps, ``second_per_grid`` 1;
            ``audio_tokens`` None = 25/s, 0 = video without audio), ``synthetic.Audio(tokens)`` and
            ``synthetic.Image(h, w)`` (LLM tokens; grid ``(1, 2h, 2w)``).
        padding_side: ``"right"`` or ``"left"``.
        seed: makes ids, pixels and mel features reproducible.
        answer: when > 0, that many text tokens are appended to every row and ``labels`` marks them.

    Returns:
        ``input_ids``, ``attention_mask``, (``labels``), and the media tensors present:
        ``input_features [n_audio, 128, frames]``, ``feature_attention_mask``, ``pixel_values_videos``,
        ``video_grid_thw``, ``video_second_per_grid``, ``pixel_values``, ``image_grid_thw``.
    """
    gen = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    merge = vc.spatial_merge_size
    per_sec = config.position_id_per_seconds
    per_chunk = per_sec * config.seconds_per_chunk
    a_id, v_id, i_id = config.audio_token_id, config.video_token_id, config.image_token_id
    a_bos, a_eos = config.audio_start_token_id, config.audio_end_token_id
    v_bos, v_eos = config.vision_start_token_id, config.vision_end_token_id
    pad_id = config.get_text_config().pad_token_id
    pad_id = TINY_PAD_ID if pad_id is None else pad_id

    with_audio = {it.num_audio > 0 for r in rows for it in r if isinstance(it, syn.Video)}
    if len(with_audio) > 1:
        raise ValueError("build_inputs: a batch mixes videos with and without audio (use_audio_in_video is per batch)")
    ids_rows, label_rows = [], []
    audio_frames, videos, images = [], [], []
    for items in rows:
        ids: list[int] = []
        for it in items:
            if isinstance(it, syn.Text):
                ids += torch.randint(1, TINY_TEXT_VOCAB, (it.tokens,), generator=gen).tolist()
            elif isinstance(it, syn.Video):
                n_frame = it.tokens_per_frame
                videos.append((it.seconds, merge * it.frame_h, merge * it.frame_w))
                if it.num_audio == 0:
                    ids += [v_bos] + [v_id] * (it.seconds * n_frame) + [v_eos]
                    continue
                audio_frames.append(_audio_frames(it.num_audio))
                ids += [v_bos, a_bos]
                frames_per_chunk = per_chunk // per_sec  # one frame (temporal grid) per second
                n_chunks = max(-(-it.seconds // frames_per_chunk), -(-it.num_audio // per_chunk))
                for c in range(n_chunks):
                    f0, f1 = c * frames_per_chunk, min((c + 1) * frames_per_chunk, it.seconds)
                    ids += [v_id] * (max(f1 - f0, 0) * n_frame)
                    a0, a1 = c * per_chunk, min((c + 1) * per_chunk, it.num_audio)
                    ids += [a_id] * max(a1 - a0, 0)
                ids += [a_eos, v_eos]
            elif isinstance(it, syn.Audio):
                audio_frames.append(_audio_frames(it.tokens))
                ids += [a_bos] + [a_id] * it.tokens + [a_eos]
            elif isinstance(it, syn.Image):
                images.append((1, merge * it.h, merge * it.w))
                ids += [v_bos] + [i_id] * (it.h * it.w) + [v_eos]
            else:
                raise TypeError(f"build_inputs: unknown item {it!r}")
        labels = [-100] * len(ids)
        if answer:
            ans = torch.randint(1, TINY_TEXT_VOCAB, (answer,), generator=gen).tolist()
            ids += ans
            labels += ans
        ids_rows.append(ids)
        label_rows.append(labels)

    B, L = len(rows), max(len(r) for r in ids_rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(L - n, L)
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        labels[b, sl] = torch.tensor(lab)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if answer:
        out["labels"] = labels
    if audio_frames:
        n_mel = config.audio_config.num_mel_bins
        T = max(audio_frames)
        feats = torch.randn(len(audio_frames), n_mel, T, generator=gen)
        fmask = torch.zeros(len(audio_frames), T, dtype=torch.long)
        for i, n in enumerate(audio_frames):
            fmask[i, :n] = 1
            feats[i, :, n:] = 0
        out["input_features"] = feats
        out["feature_attention_mask"] = fmask
    if videos:
        grid = torch.tensor(videos, dtype=torch.long)
        out["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
        out["video_grid_thw"] = grid
        out["video_second_per_grid"] = torch.ones(len(videos))
    if images:
        grid = torch.tensor(images, dtype=torch.long)
        out["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
        out["image_grid_thw"] = grid
    return out
