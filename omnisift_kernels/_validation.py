"""Input validation shared by the public entry points. Errors name the op and the argument."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OUTPUT_LAYOUTS = ("packed", "right", "left")


def check_ratio(op: str, name: str, value) -> float:
    """A removal ratio: a real number with ``0 <= value < 1`` (spec §7)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{op}: {name} must satisfy 0 <= {name} < 1, got {value!r}")
    return value


def check_token_id(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int token id, got {type(value).__name__} {value!r}")
    return int(value)


def check_output(op: str, output) -> str:
    if output not in OUTPUT_LAYOUTS:
        raise ValueError(f"{op}: output must be one of {OUTPUT_LAYOUTS}, got {output!r}")
    return output


def check_compress_inputs(
    op: str,
    inputs_embeds,
    input_ids,
    position_ids,
    attention_mask,
    labels,
) -> tuple[int, int, int]:
    """Checks types, shapes and devices of the compression inputs; returns ``(B, L, D)``."""
    if not isinstance(inputs_embeds, torch.Tensor):
        raise TypeError(f"{op}: inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}")
    if inputs_embeds.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: inputs_embeds must be float32/bfloat16/float16/float64, got {inputs_embeds.dtype}")
    if inputs_embeds.dim() != 3:
        raise ValueError(f"{op}: inputs_embeds must be [B, L, D], got shape {tuple(inputs_embeds.shape)}")
    B, L, D = inputs_embeds.shape
    dev = inputs_embeds.device

    def _int_tensor(name, t, shape):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device} but inputs_embeds is on {dev}")

    _int_tensor("input_ids", input_ids, (B, L))
    _int_tensor("position_ids", position_ids, (3, B, L))
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"{op}: attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"{op}: attention_mask must be a bool or integer tensor, got {attention_mask.dtype}")
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"{op}: attention_mask must have shape {[B, L]}, got {list(attention_mask.shape)}")
        if attention_mask.device != dev:
            raise ValueError(f"{op}: attention_mask is on {attention_mask.device} but inputs_embeds is on {dev}")
    if labels is not None:
        _int_tensor("labels", labels, (B, L))
    return B, L, D


def _cpu_kernel_available() -> bool:
    from ._ext import ext_has_kernel

    return ext_has_kernel("all_finite_cpu", "CPU")


def all_finite(x: torch.Tensor, skip_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bool scalar tensor: no NaN or Inf in ``x`` (no device read).

    ``skip_rows`` (bool ``[B, L]`` for ``x [B, L, D]``, C++ CPU kernel only): rows not to read, because
    another kernel checks them (the pipeline's video scores). Ignored (every row read) elsewhere.

    On the CPU with the extension: its ``all_finite_cpu`` kernel (the exponent bits of every element,
    one read at memory speed: 4.2 vs 6.5 ms for ``aminmax`` on omni7b-20s fp32, 1.0 vs 6.0 ms in
    bf16). Elsewhere one
    reduction pass (``aminmax`` propagates NaN, and an Inf is the min or the max), without the
    full-size boolean temporary of ``torch.isfinite(x).all()`` (30x slower on the CPU).
    """
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and _cpu_kernel_available():
        if skip_rows is not None and x.dim() == 3 and x.dtype != torch.float64:
            return torch.ops.omnisift.all_finite_cpu(x, skip_rows)
        return torch.ops.omnisift.all_finite_cpu(x)
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)


def non_finite_error(op: str) -> ValueError:
    """The error every path raises for embeddings that hold NaN or Inf."""
    return ValueError(f"{op}: inputs_embeds holds NaN or Inf values; the keep mask would be meaningless")


def check_finite(op: str, inputs_embeds: torch.Tensor, skip_rows: torch.Tensor | None = None) -> None:
    """Raises if the embeddings hold NaN or Inf (one device read); ``skip_rows`` as in :func:`all_finite`."""
    if not bool(all_finite(inputs_embeds, skip_rows)):
        raise non_finite_error(op)
