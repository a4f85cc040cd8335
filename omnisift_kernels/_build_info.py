"""``build_info()``: what this install of omnisift_kernels can run."""

from __future__ import annotations

import dataclasses
import os
import platform

import torch

from . import _ext


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What this install can run.

    Attributes:
        version: the package version.
        extension_loaded: the compiled extension ``omnisift_kernels._C`` imported.
        extension_error: why it did not, if it did not.
        extension_cpu_kernels: the extension registered CPU kernels (varlen compaction).
        extension_cuda_kernels: the extension registered CUDA kernels.
        extension_cpu_isa: instruction set of the extension's CPU inner loops ("avx512", "avx2",
            "base"), None without them.
        triton_version: the importable Triton's version, or None.
        triton_runtime: Triton kernels can run here (a CUDA device, or the interpreter).
        triton_interpreter: ``TRITON_INTERPRET=1`` is set, so Triton kernels run on the CPU.
        torch_version: ``torch.__version__``.
        cuda_version: ``torch.version.cuda`` (None on CPU builds).
        device: the device the fast path picks by default, in words.
        python_version: the interpreter's version.
    """

    version: str
    extension_loaded: bool
    extension_error: str | None
    extension_cpu_kernels: bool
    extension_cuda_kernels: bool
    extension_cpu_isa: str | None
    triton_version: str | None
    triton_runtime: bool
    triton_interpreter: bool
    torch_version: str
    cuda_version: str | None
    device: str
    python_version: str

    def summary(self) -> str:
        """One line for logs and benchmark headers."""
        ext = "none"
        if self.extension_loaded:
            kinds = [k for k, on in (("cpu", self.extension_cpu_kernels), ("cuda", self.extension_cuda_kernels)) if on]
            ext = "+".join(kinds) or "loaded (no kernels)"
            if self.extension_cpu_isa:
                ext += f" ({self.extension_cpu_isa})"
        triton = "absent"
        if self.triton_version is not None:
            mode = "interpreter" if self.triton_interpreter else ("gpu" if self.triton_runtime else "no runtime")
            triton = f"{self.triton_version} ({mode})"
        return (
            f"omnisift_kernels {self.version} | torch {self.torch_version} (cuda {self.cuda_version}) | "
            f"triton {triton} | extension {ext} | device {self.device}"
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cpu_isa() -> str | None:
    if not _ext.ext_has_kernel("all_finite_cpu", "CPU"):
        return None
    try:
        return torch.ops.omnisift.cpu_kernels_isa()
    except Exception:  # a bad OMNISIFT_CPU_ISA value
        return None


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def build_info() -> BuildInfo:
    """Reports what this install can run: extension kernels, Triton, versions and the device."""
    from . import __version__

    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:
        triton_version = None
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return BuildInfo(
        version=__version__,
        extension_loaded=_ext.EXT_AVAILABLE,
        extension_error=_ext.EXT_ERROR,
        extension_cpu_kernels=_ext.ext_has_kernel("varlen_compact", "CPU"),
        extension_cuda_kernels=_ext.ext_has_kernel("varlen_compact", "CUDA"),
        extension_cpu_isa=_cpu_isa(),
        triton_version=triton_version,
        triton_runtime=triton_version is not None and (interpreter or torch.cuda.is_available()),
        triton_interpreter=interpreter,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        device=_device_name(),
        python_version=platform.python_version(),
    )
