"""Test-environment shim: lets PyPI's CUDA torchvision wheel import beside a CPU-only torch.

The wheel's fake-tensor registrations expect the ``torchvision::nms`` and ``torchvision::qnms``
schemas, which only its compiled extension defines; when that extension cannot load next to the CPU
torch, the import fails with ``operator torchvision::nms does not exist``. Defining the two schemas
first lets the pure-Python transforms (all the Qwen2-VL processors use) import. The tests put this
directory on ``PYTHONPATH`` for the programs they run in subprocesses; it is never part of the package.
"""

from __future__ import annotations


def define_torchvision_schemas() -> None:
    """Defines ``torchvision::nms`` / ``qnms`` when torchvision's compiled ops are missing (idempotent)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    import glob
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    if hasattr(torch.ops.torchvision, "nms"):
        return
    for lib_path in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:  # a torchvision built for this torch: its own extension defines the schemas
            torch.ops.load_library(lib_path)
            return
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_TORCHVISION_SHIM_LIBRARY"] = lib  # keep the registration alive


define_torchvision_schemas()
