"""A guard that fails on host synchronisation, to prove a code path is sync-free on any device.

``torch.cuda.set_sync_debug_mode("error")`` only works on CUDA. This guard works on the CPU too: it
intercepts, through a ``TorchFunctionMode``, every tensor operation whose result the host must wait
for (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, boolean-mask indexing, ``bincount``,
``unique``, ``masked_select``, ``torch.equal``, ``repeat_interleave`` without ``output_size``, copies
to the host) and raises :class:`HostSyncError`.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
_ALWAYS = {
    _T.item, _T.tolist, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.numpy,
    _T.nonzero, torch.nonzero, torch.argwhere, _T.argwhere, torch.masked_select, _T.masked_select,
    torch.bincount, _T.bincount, torch.unique, _T.unique, torch.unique_consecutive, _T.unique_consecutive,
    torch.equal, _T.equal, torch.is_nonzero, _T.is_nonzero, torch.allclose, _T.allclose,
}


class HostSyncError(RuntimeError):
    """A guarded code path tried to read a tensor's value on the host."""


def _is_bool_index(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_is_bool_index(i) for i in index)
    return False


class forbid_host_sync(TorchFunctionMode):
    """Context manager: raise :class:`HostSyncError` on any host synchronisation inside it.

    Example::

        with forbid_host_sync():
            result = compress(..., grid=layout)   # raises if anything reads the device
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if func in _ALWAYS:
            raise HostSyncError(f"host synchronisation inside forbid_host_sync: {name}")
        if func in (_T.__getitem__, _T.__setitem__) and len(args) > 1 and _is_bool_index(args[1]):
            raise HostSyncError(f"boolean-mask indexing inside forbid_host_sync: {name}")
        if func in (torch.repeat_interleave, _T.repeat_interleave) and kwargs.get("output_size") is None:
            if len(args) > 1 and isinstance(args[1], torch.Tensor):
                raise HostSyncError("repeat_interleave with tensor repeats and no output_size inside forbid_host_sync")
        if func in (_T.cpu, _T.to) and len(args) and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            raise HostSyncError(f"device-to-host copy inside forbid_host_sync: {name}")
        return func(*args, **kwargs)
