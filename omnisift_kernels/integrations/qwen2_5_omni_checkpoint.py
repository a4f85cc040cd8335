"""Around the wrapper, for the programs (``python/infer.py``, ``python/train.py``): loading and batching.

- :func:`load_thinker`: a thinker ``from_pretrained`` (or the tiny random test thinker of
  :mod:`omnisift_kernels.testing.qwen2_5_omni`) in the chosen dtype;
- :func:`load_compressor_weights` and :func:`load_compressor_from_checkpoint`: selector weights under
  any of :data:`COMPRESSOR_PREFIXES` (the release's ``thinker.compressor.*`` included) from a state
  dict, a checkpoint directory, a safetensors file or a ``torch.save`` file;
- :func:`collate_inputs`: per-sample processor outputs batched as the thinker consumes them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .qwen2_5_omni_compat import check_transformers_version

if TYPE_CHECKING:
    from .qwen2_5_omni import OmniSIFTThinker

COMPRESSOR_PREFIXES = ("module.thinker.compressor.", "thinker.compressor.", "module.compressor.", "compressor.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_thinker(
    model: str | None,
    *,
    device: torch.device,
    dtype: str | None = None,
    tiny_random: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, torch.dtype]:
    """The thinker the programs run: a tiny random one, or ``from_pretrained(model)``.

    Args:
        model: a local path or hub id of a Qwen2.5-Omni thinker (or full model) checkpoint.
        device: where the thinker goes.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; None or ``"auto"``: bf16 for a real
            model on CUDA, else fp32.
        tiny_random: build :func:`omnisift_kernels.testing.qwen2_5_omni.tiny_random_thinker` instead
            (no weights needed).
        seed: seed of the tiny random thinker.
        attn_implementation: passed to ``from_pretrained`` when given.

    Returns:
        ``(thinker, torch dtype)``.
    """
    auto = dtype in (None, "auto")
    torch_dtype = None if auto else DTYPES.get(dtype)
    if not auto and torch_dtype is None:
        raise ValueError(f"load_thinker: dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.type == "cuda" and model else torch.float32
    if tiny_random:
        from ..testing.qwen2_5_omni import tiny_random_thinker

        return tiny_random_thinker(seed=seed).to(device=device, dtype=torch_dtype), torch_dtype
    check_transformers_version()
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    kw: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model, **kw).to(device)
    return thinker, torch_dtype


def _strip_compressor_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in COMPRESSOR_PREFIXES:
        picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if picked:
            return picked
    # A bare selector state dict (keys like "v_proj.weight"), possibly inside a bigger one.
    return dict(state_dict)


def load_compressor_weights(wrapper: OmniSIFTThinker, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Loads selector weights given with ``thinker.compressor.``, ``compressor.`` or no prefix.

    Returns:
        ``load_state_dict``'s result (missing/unexpected keys).
    """
    sd = _strip_compressor_prefix(state_dict)
    sel = wrapper.selector
    p = next(sel.parameters())
    sd = {k: v.to(device=p.device, dtype=p.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in sd.items()}
    return sel.load_state_dict(sd, strict=strict)


def load_compressor_from_checkpoint(wrapper: OmniSIFTThinker, path: str, strict: bool = True):
    """Loads ``*compressor.*`` tensors from a checkpoint directory (``*.safetensors``), a safetensors
    file or a ``torch.save`` file (a state dict, or a dict with a ``"compressor"`` entry)."""
    files = []
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"load_compressor_from_checkpoint: no *.safetensors in {path}")
    else:
        files = [path]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    if "compressor." in k or len(files) == 1:
                        sd[k] = h.get_tensor(k)
        else:
            obj = torch.load(f, map_location="cpu", weights_only=True)
            sd.update(obj.get("compressor", obj))
    if len(files) > 1 or any("compressor." in k for k in sd):
        sd = {k: v for k, v in sd.items() if "compressor." in k}
    return load_compressor_weights(wrapper, sd, strict=strict)


def collate_inputs(samples: list[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Batches per-sample processor outputs (each with batch dimension 1 or without one).

    Token tensors (``input_ids``, ``attention_mask``, ``labels``) are padded to the longest row on
    ``padding_side``; audio features are padded along frames and stacked; pixel values, grids and
    ``video_second_per_grid`` are concatenated in sample order (the order the thinker consumes them).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"collate_inputs: padding_side must be 'right' or 'left', got {padding_side!r}")
    rows = []
    for s in samples:
        s = dict(s)
        for k in ("input_ids", "attention_mask", "labels"):
            if k in s and torch.is_tensor(s[k]) and s[k].dim() == 1:
                s[k] = s[k][None]
        if "attention_mask" not in s:
            s["attention_mask"] = torch.ones_like(s["input_ids"])
        rows.append(s)
    L = max(s["input_ids"].shape[1] for s in rows)

    def pad_tokens(key, fill):
        out = []
        for s in rows:
            t = s.get(key)
            if t is None:
                t = torch.full_like(s["input_ids"], fill)
            gap = L - t.shape[1]
            out.append(F.pad(t, (gap, 0) if padding_side == "left" else (0, gap), value=fill))
        return torch.cat(out)

    batch: dict[str, Any] = {"input_ids": pad_tokens("input_ids", pad_token_id),
                             "attention_mask": pad_tokens("attention_mask", 0)}
    if any("labels" in s for s in rows):
        batch["labels"] = pad_tokens("labels", -100)
    feats = [s for s in rows if s.get("input_features") is not None]
    if feats:
        n = max(s["input_features"].shape[-1] for s in feats)
        batch["input_features"] = torch.cat([F.pad(s["input_features"], (0, n - s["input_features"].shape[-1]))
                                             for s in feats])
        batch["feature_attention_mask"] = torch.cat([F.pad(s["feature_attention_mask"],
                                                           (0, n - s["feature_attention_mask"].shape[-1]))
                                                     for s in feats])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [torch.as_tensor(s[key]).reshape(-1) if key == "video_second_per_grid" else s[key]
                 for s in rows if s.get(key) is not None]
        if parts:
            batch[key] = torch.cat(parts)
    flags = {bool(s["use_audio_in_video"]) for s in rows if s.get("use_audio_in_video") is not None}
    if len(flags) > 1:
        raise ValueError(
            "collate_inputs: samples disagree on use_audio_in_video (transformers' get_rope_index takes one flag "
            "per batch): batch videos with their sound track apart from videos without it"
        )
    if flags:
        batch["use_audio_in_video"] = flags.pop()
    return batch

