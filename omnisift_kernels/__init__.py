"""omnisift_kernels: fast, batched, exact OmniSIFT token compression for omni-modal LLMs."""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled extension, or warns once)
from ._build_info import BuildInfo, build_info

__all__ = ["BuildInfo", "build_info", "__version__"]
