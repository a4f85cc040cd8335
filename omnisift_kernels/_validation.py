"""Input validation shared by the public entry points. Errors name the op and the argument."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# input_ids and position_ids: integer dtypes wide enough for real token ids (151,656 and up) and
# TMRoPE time ids; narrower ones would wrap the placeholder ids on one backend and not another.
INDEX_DTYPES = (torch.int32, torch.int64)
OUTPUT_LAYOUTS = ("packed", "right", "left")
# Token ids are compared with int32 or int64 input_ids: ids outside int32 are refused everywhere.
TOKEN_ID_RANGE = (-(2**31), 2**31 - 1)
# Time ids (position_ids[0]) of video and audio tokens must lie in [0, TIME_ID_LIMIT): the fast plan
# sorts (row << 40 | time id) keys. Processors give ids from 0 up to 25 per second of media.
TIME_ID_BITS = 40
TIME_ID_LIMIT = 1 << TIME_ID_BITS


def check_ratio(op: str, name: str, value) -> float:
    """A removal ratio: a real number with ``0 <= value < 1`` (spec §7)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{op}: {name} must satisfy 0 <= {name} < 1, got {value!r}")
    return value


def check_token_id(op: str, name: str, value) -> int:
    """A placeholder token id: an int in the int32 range (negative ids match no token)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int token id, got {type(value).__name__} {value!r}")
    value = int(value)
    lo, hi = TOKEN_ID_RANGE
    if not lo <= value <= hi:
        raise ValueError(f"{op}: {name} must be an int32 token id in [{lo}, {hi}], got {value}")
    return value


def check_token_ids_differ(op: str, video_token_id: int, audio_token_id: int) -> None:
    """Video and audio placeholders must be different tokens (a token cannot be both)."""
    if video_token_id == audio_token_id:
        raise ValueError(f"{op}: video_token_id and audio_token_id must differ, got {video_token_id} for both")


def check_optional_bool(op: str, name: str, value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True, False or None, got {type(value).__name__} {value!r}")
    return value


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
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: inputs_embeds must be on a CPU or CUDA device, got {dev}")

    def _int_tensor(name, t, shape, dtypes=None):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(f"{op}: {name} must be int32 or int64 (narrower integers cannot hold token and "
                            f"time ids), got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device} but inputs_embeds is on {dev}")

    _int_tensor("input_ids", input_ids, (B, L), INDEX_DTYPES)
    _int_tensor("position_ids", position_ids, (3, B, L), INDEX_DTYPES)
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
    one read at memory speed, no reduction arithmetic). Elsewhere one reduction pass (``aminmax``
    propagates NaN, and an Inf is the min or the max), without the full-size boolean temporary of
    ``torch.isfinite(x).all()``.
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


# ------------------------------------------------------------------------------------------------
# Time ids (spec §1): the layout every backend relies on, checked the same way everywhere.


def layout_violations(input_ids: torch.Tensor, time_ids: torch.Tensor, valid: torch.Tensor,
                      video_token_id: int, audio_token_id: int) -> torch.Tensor:
    """Counts the layout violations of a batch with tensor ops (any device, no host read).

    Args:
        input_ids: int ``[B, L]``.
        time_ids: int ``[B, L]`` (row 0 of the TMRoPE ids).
        valid: bool ``[B, L]``, False at padding (never checked).
        video_token_id: id of video placeholders.
        audio_token_id: id of audio placeholders.

    Returns:
        int64 ``[2]``: video and audio tokens whose time id lies outside ``[0, 2**40)``, and video
        tokens whose time id is below that of an earlier video token of their row (frames out of
        time order, or interleaved).
    """
    times = time_ids.to(torch.int64)
    is_video = (input_ids == video_token_id) & valid
    media = is_video | ((input_ids == audio_token_id) & valid)
    out_of_range = media & ((times < 0) | (times >= TIME_ID_LIMIT))
    # Running maximum of the row's video time ids (-1 before its first video token).
    running = torch.cummax(torch.where(is_video, times, -1), dim=1).values if times.shape[1] else times
    decreasing = is_video & (times < running)
    return torch.stack([out_of_range.sum(), decreasing.sum()])


def time_id_range_error(op: str, row: int, col: int, value: int) -> ValueError:
    return ValueError(
        f"{op}: position_ids[0] (time ids) must lie in [0, 2**{TIME_ID_BITS}) at video and audio tokens, "
        f"got {value} at row {row}, column {col}")


def time_id_order_error(op: str, row: int, col: int, value: int, prev_col: int, prev_value: int) -> ValueError:
    return ValueError(
        f"{op}: position_ids[0] (time ids) must not decrease along a row's video tokens (each frame's tokens "
        f"share one time id and frames come in time order, spec §1), got {value} at row {row}, column {col} "
        f"after {prev_value} at column {prev_col}")


def layout_error(op: str, input_ids: torch.Tensor, time_ids: torch.Tensor, valid: torch.Tensor,
                 video_token_id: int, audio_token_id: int, counts) -> ValueError:
    """The error of a batch whose :func:`layout_violations` are ``counts``: the first violation's, as
    the reference's row check words it (error path only: reads the tensors on the host)."""
    from .reference.plan import check_time_ids

    try:
        for b in range(input_ids.shape[0]):
            check_time_ids(op, b, input_ids[b].cpu(), time_ids[b].cpu(), valid[b].cpu(), video_token_id,
                           audio_token_id)
    except ValueError as e:
        return e
    out_of_range, decreasing = (int(c) for c in counts)
    return ValueError(f"{op}: position_ids[0] (time ids) break the layout: {out_of_range} video/audio token(s) "
                      f"outside [0, 2**{TIME_ID_BITS}), {decreasing} video token(s) out of time order")


# ------------------------------------------------------------------------------------------------
# The ops' arguments (omnisift_kernels.ops): types and shapes, then index values.


def check_tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_embeddings(op: str, x, name: str = "x") -> torch.Tensor:
    check_tensor(op, name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32/bfloat16/float16/float64, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be 3-D [B, L, D], got {x.dim()}-D shape {tuple(x.shape)}")
    return x


def check_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} (the device of the embeddings), "
                         f"got {t.device}")


def check_index(op: str, name: str, t, device: torch.device, length: int | None = None,
                length_desc: str = "") -> torch.Tensor:
    check_tensor(op, name, t)
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got {t.dim()}-D shape {tuple(t.shape)}")
    check_device(op, name, t, device)
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have length {length}{length_desc}, got {t.shape[0]}")
    return t


def check_offsets(op: str, seg_offsets, device: torch.device,
                  num_segments: int | None = None) -> torch.Tensor:
    check_index(op, "seg_offsets", seg_offsets, device)
    if seg_offsets.shape[0] < 1:
        raise ValueError(f"{op}: seg_offsets must have length S+1 >= 1, got 0")
    if num_segments is not None and seg_offsets.shape[0] != num_segments + 1:
        raise ValueError(f"{op}: seg_offsets must have length S+1 = {num_segments + 1} "
                         f"(S = len(k)), got {seg_offsets.shape[0]}")
    return seg_offsets


def _reads_values(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t`` on the host: CPU tensors, outside compile tracing."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_index_values(op: str, name: str, t: torch.Tensor, upper: int, allow_negative: bool = False) -> None:
    """Every entry of the int64 index ``t`` in ``[0, upper)`` (any negative too, if ``allow_negative``).

    CPU tensors: a ValueError naming the first bad entry. Elsewhere a device-side assertion (no host read).
    """
    if t.numel() == 0:
        return
    bad = (t >= upper) if allow_negative else ((t < 0) | (t >= upper))
    expected = f"negative or < {upper} (B*L)" if allow_negative else f"in [0, {upper}) (B*L)"
    if _reads_values(t):
        if bool(bad.any()):
            i = int(bad.to(torch.int8).argmax())
            raise ValueError(f"{op}: {name} values must be {expected}, got {name}[{i}] = {int(t[i])}")
    else:
        torch._assert_async(~bad.any(), f"{op}: {name} values must be {expected}")


def check_offsets_values(op: str, seg_offsets: torch.Tensor, n: int) -> None:
    """CSR offsets: ``seg_offsets[0] == 0``, non-decreasing, ``seg_offsets[-1] == n``.

    CPU tensors: a ValueError. Elsewhere a device-side assertion (no host read).
    """
    steps = seg_offsets[1:] - seg_offsets[:-1]
    if _reads_values(seg_offsets):
        first, last = int(seg_offsets[0]), int(seg_offsets[-1])
        if first != 0 or last != n:
            raise ValueError(f"{op}: seg_offsets must run from 0 to N = {n} (the indexed length), got "
                             f"{first} to {last}")
        if steps.numel() and bool((steps < 0).any()):
            s = int((steps < 0).to(torch.int8).argmax())
            raise ValueError(f"{op}: seg_offsets must be non-decreasing, got seg_offsets[{s}] = "
                             f"{int(seg_offsets[s])} > seg_offsets[{s + 1}] = {int(seg_offsets[s + 1])}")
    else:
        ok = (seg_offsets[0] == 0) & (seg_offsets[-1] == n) & (steps >= 0).all()
        torch._assert_async(ok, f"{op}: seg_offsets must run from 0 to N = {n} and be non-decreasing")


def check_distinct_values(op: str, name: str, t: torch.Tensor, upper: int) -> None:
    """No entry of ``t`` (values in ``[0, upper)``, checked before) appears twice."""
    if t.numel() < 2:
        return
    counts = torch.zeros(upper, dtype=torch.int32, device=t.device).index_add_(
        0, t, torch.ones_like(t, dtype=torch.int32))
    if _reads_values(t):
        if bool((counts > 1).any()):
            v = int((counts > 1).to(torch.int8).argmax())
            raise ValueError(f"{op}: {name} values must be distinct, got {v} more than once")
    else:
        torch._assert_async((counts <= 1).all(), f"{op}: {name} values must be distinct")


# ----------------------------------------------------------------------------------------------
# The varlen ops


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` on the device of ``ref`` (the varlen ops name both arguments)."""
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_size(op: str, name: str, value, minimum: int = 0) -> int:
    """A size argument: an int (or a SymInt while tracing) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if isinstance(value, int) and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def check_compact_inputs(op: str, x, keep, position_ids, labels, total) -> None:
    """The arguments of ``varlen_compact`` / ``varlen_pad`` (types, shapes, devices; never values)."""
    check_tensor(op, "x", x)
    check_tensor(op, "keep", keep)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be 3-D [B, L, D], got shape {tuple(x.shape)}")
    B, L = x.shape[0], x.shape[1]
    if keep.dtype != torch.bool:
        raise TypeError(f"{op}: keep must be a bool tensor, got {keep.dtype}")
    if tuple(keep.shape) != (B, L):
        raise ValueError(f"{op}: keep must have shape [B, L] = {[B, L]}, got {list(keep.shape)}")
    check_same_device(op, "keep", keep, "x", x)
    if position_ids is not None:
        check_tensor(op, "position_ids", position_ids)
        ok = (position_ids.dim() == 2 and tuple(position_ids.shape) == (B, L)) or (
            position_ids.dim() == 3 and tuple(position_ids.shape[1:]) == (B, L)
        )
        if not ok:
            raise ValueError(
                f"{op}: position_ids must have shape [3, B, L] (or [K, B, L] / [B, L]) with B, L = {B}, {L}, "
                f"got {list(position_ids.shape)}"
            )
        check_same_device(op, "position_ids", position_ids, "x", x)
    if labels is not None:
        check_tensor(op, "labels", labels)
        if tuple(labels.shape) != (B, L):
            raise ValueError(f"{op}: labels must have shape [B, L] = {[B, L]}, got {list(labels.shape)}")
        check_same_device(op, "labels", labels, "x", x)
    if total is not None:
        check_size(op, "total", total)
        if isinstance(total, int) and total > B * L:
            raise ValueError(f"{op}: total must be <= B*L = {B * L}, got {total}")
