"""The compression settings of a served model, read from its (overridden) Hugging Face config.

vLLM has no engine argument of its own for a plugin, so the settings travel with the model config:
``hf_overrides={"omnisift": {...}}`` (``--hf-overrides '{"omnisift": {...}}'`` on the command line) or
an ``"omnisift"`` section saved in the checkpoint's ``config.json``. Keys:

- ``preset``: a ratio preset of :data:`omnisift_kernels.PRESETS` (``"paper-35"``, ``"paper-25"``,
  ``"release-default"``); it sets both ratios, as everywhere in this library;
- ``rho_video``, ``rho_audio``: the removal ratios (``0 <= rho < 1``), used when no preset is given
  (a missing one defaults to the release's 0.7 / 0.3);
- ``enabled``: False serves the stock model.

The same keys are also read flat from the config (``hf_overrides={"rho_video": 0.7, "rho_audio":
0.3}``, or ``omnisift_preset``/``omnisift_rho_video``/``omnisift_rho_audio``) when there is no
section. With no setting at all, a local checkpoint whose weights hold the selector
(``thinker.compressor.*``, an OmniSIFT checkpoint) is served compressed at the release's ratios
(0.7 / 0.3, ``OmniSIFTThinker``'s defaults); any other checkpoint is served as vLLM serves it.

The processor (placeholder counts) and the model (the compressor) both read :func:`serving_config`,
so they always agree.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
from typing import Any

from ...presets import get_preset

CONFIG_KEY = "omnisift"
_KEYS = ("enabled", "preset", "rho_video", "rho_audio")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Compression settings of one engine.

    Attributes:
        enabled: whether the plugin compresses at all (False: the stock model).
        rho_video: fraction of each video frame's tokens removed.
        rho_audio: fraction of each scored audio chunk removed.
        preset: the preset name the ratios came from, or None.
    """

    enabled: bool
    rho_video: float
    rho_audio: float
    preset: str | None = None

    def cache_tag(self) -> str:
        """A string that names the ratios, folded into the multimodal hashes (encoder and prefix caches)."""
        return f"omnisift:v={self.rho_video!r}:a={self.rho_audio!r}"


_FLAT = {"preset": ("omnisift_preset",), "rho_video": ("omnisift_rho_video", "rho_video"),
         "rho_audio": ("omnisift_rho_audio", "rho_audio")}


def _section(hf_config: Any) -> tuple[Any, str]:
    """The settings given on the config (or its thinker config), and how they were given."""
    for cfg in (hf_config, getattr(hf_config, "thinker_config", None)):
        if cfg is None:
            continue
        section = getattr(cfg, CONFIG_KEY, None)
        if section is not None:
            return section, f"hf_overrides['{CONFIG_KEY}']"
        flat = {key: getattr(cfg, name) for key, names in _FLAT.items() for name in names
                if getattr(cfg, name, None) is not None}
        if flat:
            return flat, "hf_overrides"
    return None, ""


@functools.lru_cache(maxsize=64)
def checkpoint_has_selector(model_path: str) -> bool:
    """Whether a local checkpoint directory's ``*.safetensors`` hold ``thinker.compressor.*`` tensors
    (read from the files' headers only; False for anything that is not a local directory)."""
    if not model_path or not os.path.isdir(model_path):
        return False
    for name in sorted(os.listdir(model_path)):
        if not name.endswith(".safetensors"):
            continue
        try:
            with open(os.path.join(model_path, name), "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            continue
        if any(k.startswith("thinker.compressor.") for k in header):
            return True
    return False


def serving_config(hf_config: Any, model_path: str | None = None) -> ServingConfig:
    """The :class:`ServingConfig` of a ``Qwen2_5OmniConfig`` (or its thinker config).

    Args:
        hf_config: the model config, with vLLM's ``hf_overrides`` applied.
        model_path: the served checkpoint (``model_config.model``); without settings, a local one with
            selector weights is served compressed at the release's ratios.

    Raises:
        TypeError: a section that is not a dict, or a value of the wrong type.
        ValueError: an unknown key or preset, or a ratio outside ``[0, 1)``.
    """
    section, where = _section(hf_config)
    if section is None:
        if model_path is not None and checkpoint_has_selector(str(model_path)):
            return ServingConfig(enabled=True, rho_video=0.7, rho_audio=0.3)
        return ServingConfig(enabled=False, rho_video=0.0, rho_audio=0.0)
    if not isinstance(section, dict):
        raise TypeError(f"omnisift vLLM plugin: {where} must be a dict with keys among {list(_KEYS)}, "
                        f"got {type(section).__name__} {section!r}")
    unknown = sorted(set(section) - set(_KEYS))
    if unknown:
        raise ValueError(f"omnisift vLLM plugin: {where} has unknown keys {unknown}; expected keys among {list(_KEYS)}")
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TypeError(f"omnisift vLLM plugin: {where}['enabled'] must be a bool, got {type(enabled).__name__} {enabled!r}")
    preset = section.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise TypeError(f"omnisift vLLM plugin: {where}['preset'] must be a str, got {type(preset).__name__} {preset!r}")
        chosen = get_preset(preset)
        rho_video, rho_audio = chosen.rho_video, chosen.rho_audio
    else:
        rho_video = section.get("rho_video", 0.7)
        rho_audio = section.get("rho_audio", 0.3)
    ratios = {}
    for name, value in (("rho_video", rho_video), ("rho_audio", rho_audio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"omnisift vLLM plugin: {where}['{name}'] must be a float in [0, 1), got "
                            f"{type(value).__name__} {value!r}")
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise ValueError(f"omnisift vLLM plugin: {where}['{name}'] must be in [0, 1), got {value!r}")
        ratios[name] = float(value)
    return ServingConfig(enabled=enabled, preset=preset, **ratios)
