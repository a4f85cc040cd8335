"""Integrations of OmniSIFT compression with model libraries.

``omnisift_kernels.integrations.qwen2_5_omni`` wraps transformers' Qwen2.5-Omni thinker;
``omnisift_kernels.integrations.qwen2_5_omni_inputs`` turns media files into its processor's outputs
(PyAV decoding, the processor call of each transformers 5.x release). Importing this package does not
import transformers; the names below load on first access.
"""

from __future__ import annotations

_QWEN = (
    "OmniSIFTThinker",
    "OmniSIFTOutput",
    "wrap_omni_model",
    "load_compressor_weights",
    "load_compressor_from_checkpoint",
    "check_transformers_version",
    "SUPPORTED_TRANSFORMERS",
    "tiny_thinker_config",
    "tiny_random_thinker",
    "build_inputs",
    "collate_inputs",
)

__all__ = list(_QWEN)


def __getattr__(name: str):
    if name in _QWEN:
        from . import qwen2_5_omni

        return getattr(qwen2_5_omni, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
