"""What differs between the transformers 5.x releases the Qwen2.5-Omni integration supports.

- :func:`check_transformers_version` and the versions: :data:`SUPPORTED_TRANSFORMERS` (5.0 <= version
  < 6.0) and :data:`TESTED_TRANSFORMERS`. 4.x is refused (its thinker and generate internals differ; the
  spec's facts are for 5.x).
- Where the thinker keeps things: :func:`text_model` (the text decoder) and :func:`_rope_holder` (the
  module with ``rope_deltas``) moved from the thinker to ``thinker.model`` around 5.20.
- :func:`generate_honors_position_ids`: from 5.16 ``generate`` keeps passed 4-row position ids; 5.0-5.15
  drop them in the thinker's ``prepare_inputs_for_generation``, so there
  :func:`generate_with_prefill_positions` passes them to the prefill and decoding follows ``rope_deltas``
  (same positions, checked by the tests).
- Outputs: :func:`embed_inputs` merges the ``get_*_features`` results (a ModelOutput, a tensor or a
  per-item tuple, see :func:`_as_tensor`) into the input embeddings; :func:`_output_cache` reads the
  KV cache (``past_key_values``, named ``cache`` from 5.24).

transformers is imported only inside the functions that need it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

SUPPORTED_TRANSFORMERS = ("5.0", "6.0")  # [min, max)
TESTED_TRANSFORMERS = ("5.0.0", "5.15.1", "5.17.0", "5.22.0", "5.23.0", "5.24.0", "5.25.0")


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit()) if not part.isdigit() else part
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


def check_transformers_version(version: str | None = None) -> str:
    """Raises ``RuntimeError`` unless transformers is in :data:`SUPPORTED_TRANSFORMERS` (5.0 <= v < 6.0).

    Args:
        version: the version string to check; None reads ``transformers.__version__``.

    Returns:
        The checked version string.
    """
    if version is None:
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - transformers is a test dependency
            raise RuntimeError(
                "omnisift_kernels.integrations.qwen2_5_omni needs transformers "
                f">={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]} (pip install 'transformers>=5,<6')"
            ) from e
        version = transformers.__version__
    v = _version_tuple(version)
    lo, hi = _version_tuple(SUPPORTED_TRANSFORMERS[0]), _version_tuple(SUPPORTED_TRANSFORMERS[1])
    if not v or v < lo or v >= hi:
        raise RuntimeError(
            f"OmniSIFT's Qwen2.5-Omni integration supports transformers >={SUPPORTED_TRANSFORMERS[0]},"
            f"<{SUPPORTED_TRANSFORMERS[1]} (tested: {', '.join(TESTED_TRANSFORMERS)}); found {version}. "
            "transformers 4.x recomputes decoding positions inside generate and cannot decode a compressed "
            "prompt correctly; install 'transformers>=5,<6'."
        )
    return version


def text_model(thinker: nn.Module) -> nn.Module:
    """The thinker's text decoder: ``thinker.model.language_model`` (transformers >= ~5.20, where
    ``thinker.model`` is the multimodal ``Qwen2_5OmniThinkerModel``) or ``thinker.model`` (5.0-5.1x)."""
    return getattr(thinker.model, "language_model", thinker.model)


def generate_honors_position_ids(thinker: nn.Module) -> bool:
    """True when ``thinker.generate`` keeps passed ``position_ids`` and extends them by last + 1 per step
    (transformers >= 5.16, where the thinker no longer overrides ``prepare_inputs_for_generation``)."""
    from transformers.generation.utils import GenerationMixin

    method = type(thinker).prepare_inputs_for_generation
    return getattr(method, "__func__", method) is GenerationMixin.prepare_inputs_for_generation


def _rope_holder(thinker: nn.Module) -> nn.Module:
    """The module whose ``rope_deltas`` the thinker reads (``thinker.model`` or, before ~5.20, ``thinker``)."""
    return thinker.model if hasattr(thinker.model, "language_model") else thinker


def _as_tensor(out: Any, attr: str) -> torch.Tensor:
    """Feature tensor from a ``get_*_features`` result (ModelOutput, tensor or per-item tuple)."""
    if torch.is_tensor(out):
        return out
    value = getattr(out, attr, None) if not isinstance(out, (tuple, list)) else None
    if value is None and not isinstance(out, (tuple, list)):
        value = out[0]
    if value is None:
        value = out
    if isinstance(value, (tuple, list)):
        return torch.cat(list(value), dim=0)
    return value


def _output_cache(out: Any) -> Any:
    """The KV cache of a transformers output: ``past_key_values`` before 5.24, ``cache`` from 5.24."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


def embed_inputs(
    thinker: nn.Module,
    input_ids: torch.Tensor,
    *,
    input_features: torch.Tensor | None = None,
    feature_attention_mask: torch.Tensor | None = None,
    audio_feature_lengths: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> torch.Tensor:
    """``inputs_embeds [B, L, D]``: the input embeddings with the audio, image and video features
    scattered into their placeholder tokens, through the thinker's public ``get_*_features`` methods."""
    cfg = thinker.config
    embeds = thinker.get_input_embeddings()(input_ids)

    def scatter(embeds, token_id, feats):
        mask = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
        n = int((input_ids == token_id).sum())
        if n * embeds.shape[-1] != feats.numel():
            raise ValueError(
                f"OmniSIFTThinker: {n} placeholder tokens (id {token_id}) but features of shape {tuple(feats.shape)}"
            )
        return embeds.masked_scatter(mask, feats.to(embeds.device, embeds.dtype))

    if input_features is not None:
        out = thinker.get_audio_features(input_features, feature_attention_mask, audio_feature_lengths)
        embeds = scatter(embeds, cfg.audio_token_id, _as_tensor(out, "last_hidden_state"))
    if pixel_values is not None:
        out = thinker.get_image_features(pixel_values, image_grid_thw)
        embeds = scatter(embeds, cfg.image_token_id, _as_tensor(out, "pooler_output"))
    if pixel_values_videos is not None:
        out = thinker.get_video_features(pixel_values_videos, video_grid_thw)
        embeds = scatter(embeds, cfg.video_token_id, _as_tensor(out, "pooler_output"))
    return embeds


def generate_with_prefill_positions(thinker: nn.Module, prompt: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """``thinker.generate`` on a compressed prompt for transformers 5.0-5.15.

    There the thinker's ``prepare_inputs_for_generation`` drops passed position ids and decodes at
    ``arange + past length + rope_deltas``. The prefill gets the kept ids through a per-call override;
    ``rope_deltas = max(kept) + 1 - K`` (K the padded compressed length) then puts decode step s at
    ``max(kept) + 1 + s``.

    Args:
        thinker: the thinker.
        prompt: :meth:`OmniSIFTThinker.prepare_generation`'s ``inputs_embeds``, ``attention_mask`` and
            ``position_ids [4, B, K]``.
        **kwargs: ``GenerationMixin.generate`` arguments.
    """
    pos4 = prompt["position_ids"]
    K = pos4.shape[-1]
    _rope_holder(thinker).rope_deltas = (pos4[1:].amax(dim=(0, 2)) + 1 - K).view(-1, 1)
    original = thinker.prepare_inputs_for_generation

    @functools.wraps(original)  # generate validates kwargs against this signature
    def prepare(*args, **kw):
        out = original(*args, **kw)
        embeds = out.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] == K:  # the prefill
            out["position_ids"] = pos4
        return out

    thinker.prepare_inputs_for_generation = prepare
    try:
        return thinker.generate(inputs_embeds=prompt["inputs_embeds"], attention_mask=prompt["attention_mask"],
                                **kwargs)
    finally:
        del thinker.prepare_inputs_for_generation
