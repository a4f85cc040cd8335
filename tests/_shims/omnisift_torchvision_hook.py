"""Test-environment shim: lets PyPI's CUDA torchvision wheel import beside a CPU-only torch.

The wheel's fake-tensor registrations expect the ``torchvision::nms`` and ``torchvision::qnms``
schemas, which only its compiled extension defines; when that extension cannot load next to the CPU
torch, ``import torchvision`` fails with ``operator torchvision::nms does not exist`` (and with it every
transformers model class that imports its image/video utilities). Defining the two schemas first lets
the pure-Python transforms (all the Qwen2-VL processors use) import.

Importing this module installs a ``sys.meta_path`` hook that defines the schemas just before
torchvision is first imported, and only when torchvision's own extension cannot load. ``make setup``
adds it to the test virtual environment through a ``.pth`` file where (and only where) the plain
import fails; ``tests/_shims/sitecustomize.py`` applies it to programs the tests run. It is never part
of the ``omnisift_kernels`` package.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_done = False


def define_torchvision_schemas() -> bool:
    """Defines ``torchvision::nms`` / ``qnms`` when torchvision's compiled ops cannot load.

    Returns:
        True when the schemas were defined here, False when nothing was needed (no torchvision, or its
        extension loads, or they exist already).
    """
    global _done
    if _done:
        return False
    _done = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return False
    for lib_path in glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so")):
        try:  # a torchvision built for this torch: its own extension defines the schemas
            torch.ops.load_library(lib_path)
            return False
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_LIBRARY"] = lib  # keep the registration alive
    return True


class _Finder:
    """Runs :func:`define_torchvision_schemas` when ``torchvision`` is first imported, then steps aside."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torchvision" and not _done:
            try:
                sys.meta_path.remove(_Finder)
            except ValueError:
                pass
            define_torchvision_schemas()
        return None  # the regular finders import torchvision itself


def install() -> None:
    """Installs the import hook (idempotent); applies at once when torchvision is already imported."""
    if "torchvision" in sys.modules:
        return
    if _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)


install()
