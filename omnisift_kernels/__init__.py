"""omnisift_kernels: fast, batched, exact OmniSIFT token compression for omni-modal LLMs."""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled extension, or warns once)
from . import cpu_gemm  # noqa: F401  (the selector's CPU GEMM choice)
from ._build_info import BuildInfo, build_info
from .api import compress
from .presets import PRESETS, RatioPreset, get_preset
from .modules import OmniSIFTCompressor, SpatioTemporalVideoPruner
from .result import CompressionResult
from .selector import VisionGuidedAudioSelector
from .ste import StraightThroughKeep, straight_through_keep

__all__ = [
    "BuildInfo",
    "CompressionResult",
    "OmniSIFTCompressor",
    "PRESETS",
    "RatioPreset",
    "SpatioTemporalVideoPruner",
    "StraightThroughKeep",
    "VisionGuidedAudioSelector",
    "__version__",
    "build_info",
    "compress",
    "get_preset",
    "straight_through_keep",
]
