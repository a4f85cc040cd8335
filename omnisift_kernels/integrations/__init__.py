"""Integrations of OmniSIFT compression with model libraries.

``omnisift_kernels.integrations.qwen2_5_omni`` wraps transformers' Qwen2.5-Omni thinker (with
``qwen2_5_omni_compat``: what differs between transformers 5.x releases; ``qwen2_5_omni_layout``: the
token layout read from the ids; ``qwen2_5_omni_checkpoint``: loading the thinker and compressor weights,
batching samples); ``omnisift_kernels.integrations.qwen2_5_omni_inputs`` turns media files into its
processor's outputs (PyAV decoding, the processor call of each transformers 5.x release). The tiny random
thinker and hand-built inputs of the tests are in ``omnisift_kernels.testing.qwen2_5_omni``. Importing
this package does not import transformers; the names below load on first access.
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
    "collate_inputs",
)

__all__ = list(_QWEN)


def __getattr__(name: str):
    if name in _QWEN:
        from . import qwen2_5_omni

        return getattr(qwen2_5_omni, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
