"""The implementations the benchmark compares.

A provider is available or not *on this machine, now*: a missing device, Triton or compiled
extension kernel makes it "unavailable: <reason>", never a crash.

==================  ========================================================================
``reference``       ``compress(backend="reference")``: the per-row oracle
``release-loop``    :mod:`bench.release_loop`: the authors' release style (baseline of speedups)
``compile-reference`` ``torch.compile`` of the reference (graph breaks; slow to compile: only when
                    asked for with ``--provider compile-reference``)
``cpu``             ``compress(backend="cpu")``: the batched fast path (``omnisift_kernels.pipeline``)
``triton``          ``compress(backend="triton")``: CUDA only
                    (stages of both: :func:`bench.stages.pipeline_stages`)
``extension``       ``omnisift_kernels.ops.varlen_compact``: the compaction (``gather`` stage) only
``bool-index``      boolean-mask indexing, the plain-PyTorch compaction baseline (``gather`` only)
==================  ========================================================================
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from omnisift_kernels import _ext
from omnisift_kernels.ops import varlen_compact
from omnisift_kernels.request import CompressRequest

from . import stages as S
from .release_loop import release_loop_compress

SKIPPED_SLOW = "skipped (slow; pass --provider compile-reference)"


@dataclasses.dataclass
class Provider:
    """One implementation.

    Attributes:
        name: as on the command line and in the table.
        about: one line.
        check: ``check(device) -> None | str``: None when available, else why not.
        e2e: ``e2e(case) -> fn`` with ``fn()`` running the provider end to end and returning the keep
            mask ``[B, L]``; None for providers of a single stage.
        stage_factory: ``stage_factory(device) -> factory | None`` (see :mod:`bench.stages`).
        explicit_only: only run when named with ``--provider`` (else reported as skipped).
    """

    name: str
    about: str
    check: Callable[[torch.device], str | None]
    e2e: Callable[[Any], Callable[[], torch.Tensor]] | None
    stage_factory: Callable[[torch.device], Any]
    explicit_only: bool = False


def _exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _compress_e2e(backend: str):
    def make(case):
        from omnisift_kernels import compress

        kw = case.kwargs()
        return lambda: compress(**kw, backend=backend).keep_mask

    return make


def _check_cpu(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "backend='cpu' needs CPU tensors (run with --device cpu; on CUDA the fast path is triton)"
    return None


def _check_triton(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton not importable ({_exc(e)})"
    return None


# -------------------------------------------------------------------------- compile-reference
_COMPILED: dict[str, Any] = {}


def _compiled_reference():
    if "fn" not in _COMPILED:
        from omnisift_kernels.reference import reference_compress

        # Graph breaks (.item(), nonzero, Python loops) are expected: keep their warnings quiet.
        torch._logging.set_logs(dynamo=logging.ERROR, graph_breaks=False, recompiles=False)
        # `from torch import ...`, not `import torch._dynamo`: the latter binds `torch` as a local
        # name of this function, so the line above would fail with UnboundLocalError.
        from torch import _dynamo

        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        _COMPILED["fn"] = torch.compile(reference_compress)
    return _COMPILED["fn"]


def _compile_e2e(case):
    fn = _compiled_reference()
    request = CompressRequest(**case.kwargs())
    return lambda: fn(request).keep_mask


def _check_compile(device: torch.device) -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile missing"
    return None


# --------------------------------------------------------------------------------- extension
def _check_extension(device: torch.device) -> str | None:
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not _ext.ext_has_kernel("varlen_compact", key):
        why = _ext.EXT_ERROR or f"no {key} kernel registered"
        return f"compiled extension has no {key} varlen_compact ({why.splitlines()[0][:160]})"
    return None


def extension_stages(keep_masks: dict[int, torch.Tensor]):
    """Stage factory of the extension: ``gather`` = ``varlen_compact`` of the reference keep mask.

    ``keep_masks`` maps ``id(case)`` to the reference keep mask of that case (filled by the CLI).
    """

    def factory(case):
        kw = case.kwargs()
        x, keep = kw["inputs_embeds"], keep_masks[id(case)]
        pos, labels = kw["position_ids"], kw["labels"]

        def call():
            return varlen_compact(x, keep, position_ids=pos, labels=labels)

        return {"gather": call, "_packed": lambda: call().packed}

    return factory


def bool_index_stages(keep_masks: dict[int, torch.Tensor]):
    """Stage factory of the plain-PyTorch baseline of compaction: boolean-mask indexing
    (``x.flatten(0, 1)[keep.flatten()]``, positions and labels likewise) of the reference keep mask."""

    def factory(case):
        kw = case.kwargs()
        x, keep = kw["inputs_embeds"], keep_masks[id(case)]
        pos, labels = kw["position_ids"], kw["labels"]

        def call():
            k = keep.flatten()
            return x.flatten(0, 1)[k], pos.flatten(1)[:, k], labels.flatten()[k]

        return {"gather": call, "_packed": lambda: call()[0]}

    return factory


SINGLE_STAGE = {"extension": extension_stages, "bool-index": bool_index_stages}


# ------------------------------------------------------------------------------------ registry
def _hook(name: str):
    return lambda device: S.STAGE_HOOKS.get(name)


def _pipeline_hook(backend: str):
    return lambda device: (lambda case: S.pipeline_stages(case, backend))


def _release_e2e(case):
    kw = case.kwargs()
    return lambda: release_loop_compress(**kw)[0]


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in [
        Provider("reference", "compress(backend='reference')", lambda d: None, _compress_e2e("reference"),
                 _hook("reference")),
        Provider("release-loop", "authors' release style (bench/release_loop.py)", lambda d: None, _release_e2e,
                 _hook("release-loop")),
        Provider("compile-reference", "torch.compile(reference_compress)", _check_compile, _compile_e2e,
                 lambda d: None, explicit_only=True),
        Provider("cpu", "compress(backend='cpu')", _check_cpu, _compress_e2e("cpu"), _pipeline_hook("cpu")),
        Provider("triton", "compress(backend='triton')", _check_triton, _compress_e2e("triton"),
                 _pipeline_hook("triton")),
        Provider("extension", "omnisift_kernels.ops.varlen_compact (gather only)", _check_extension, None,
                 lambda d: None),
        Provider("bool-index", "x.flatten(0, 1)[keep.flatten()] (gather only; plain PyTorch)", lambda d: None, None,
                 lambda d: None),
    ]
}
BASELINE = "release-loop"


def availability(device: torch.device) -> dict[str, str | None]:
    """``{name: None (available) or reason}`` for every provider."""
    out = {}
    for name, p in PROVIDERS.items():
        try:
            out[name] = p.check(device)
        except Exception as e:  # a check itself must never crash the CLI
            out[name] = f"availability check failed ({_exc(e)})"
    return out
