"""Testing helpers: the tolerance table, score comparisons, layouts, near ties, CPU settings.

The per-op references (the oracles) live in :mod:`omnisift_kernels.reference`. The Qwen2.5-Omni fixtures
(tiny random thinker, hand-built inputs) are in :mod:`omnisift_kernels.testing.qwen2_5_omni`, not
imported here (it builds transformers objects).

Tolerances: every comparison of similarities or scores in the test suite goes through
:data:`TOLERANCES` (via :func:`tolerance` / :func:`assert_close_scores`). Masks, compaction and
gathers are compared exactly (``torch.equal``), never with a tolerance.

Kinds:

* ``"similarity"``: a kernel that computes in fp32 from the input values vs a reference computed
  in fp32 (float64 for extra safety is fine) from the same values upcast (``x.float()``).
  The inputs are identical, only the fp32 summation order differs, so the tolerance is tight and
  nearly dtype independent.
* ``"native"``: an fp32 result vs a reference computed in the input dtype itself (e.g.
  ``F.cosine_similarity`` on bf16 tensors): the input dtype's rounding dominates.
* ``"score"``: selector scores (sigmoid outputs in (0, 1)) computed with the model in the input
  dtype vs the fp32 model.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

__all__ = [
    "TOLERANCES",
    "set_cpu_env",
    "assert_close_scores",
    "near_tie_differences",
    "nan_poisoned",
    "random_layout",
    "tolerance",
]

# (dtype, kind) -> (atol, rtol)
TOLERANCES: dict[tuple[torch.dtype, str], tuple[float, float]] = {
    (torch.float64, "similarity"): (1e-5, 1e-5),
    (torch.float32, "similarity"): (1e-5, 1e-5),
    (torch.bfloat16, "similarity"): (1e-5, 1e-5),
    (torch.float16, "similarity"): (1e-5, 1e-5),
    (torch.float64, "native"): (1e-5, 1e-5),
    (torch.float32, "native"): (1e-5, 1e-5),
    (torch.bfloat16, "native"): (2e-2, 2e-2),
    (torch.float16, "native"): (2e-3, 2e-3),
    (torch.float64, "score"): (1e-6, 1e-6),
    (torch.float32, "score"): (1e-5, 1e-5),
    (torch.bfloat16, "score"): (2e-2, 2e-2),
    (torch.float16, "score"): (2e-3, 2e-3),
}


def tolerance(dtype: torch.dtype, kind: str = "similarity") -> tuple[float, float]:
    """``(atol, rtol)`` for values computed from inputs of ``dtype`` (see the module docstring)."""
    try:
        return TOLERANCES[(dtype, kind)]
    except KeyError:
        raise KeyError(f"no tolerance for dtype={dtype}, kind={kind!r}; kinds: "
                       f"{sorted({k for _, k in TOLERANCES})}") from None


def assert_close_scores(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                        kind: str = "similarity", msg: str | None = None) -> None:
    """``torch.testing.assert_close`` in fp64 with the table's tolerance; NaN never passes."""
    atol, rtol = tolerance(dtype, kind)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"NaN in actual scores{': ' + msg if msg else ''}"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol,
                               rtol=rtol, msg=msg)


def nan_poisoned(shape, dtype=torch.float32, device="cpu", fill=None) -> torch.Tensor:
    """An output buffer filled with NaN, to prove a kernel writes every element.

    ``bool`` has no NaN: the buffer is filled with ``fill`` (default True); tests run a mask
    kernel twice, with ``fill=True`` and ``fill=False``, and require the same result.
    """
    if isinstance(shape, int):
        shape = (shape,)
    if dtype == torch.bool:
        return torch.full(shape, True if fill is None else bool(fill), dtype=torch.bool,
                          device=device)
    return torch.full(shape, float("nan") if fill is None else fill, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Layouts


def random_layout(B: int, L: int, sizes: Sequence[int], generator: random.Random | None = None,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A CSR layout with segments of ``sizes`` over distinct flat tokens of a ``[B, L]`` grid.

    Each segment's tokens are ascending; segments take disjoint random tokens.

    Returns:
        ``(token_index int64 [N], seg_offsets int64 [S+1])``.
    """
    rng = generator or random.Random(0)
    n = sum(sizes)
    if n > B * L:
        raise ValueError(f"random_layout: {n} tokens do not fit in B*L = {B * L}")
    pool = rng.sample(range(B * L), n)
    toks, offs, pos = [], [0], 0
    for size in sizes:
        toks.extend(sorted(pool[pos:pos + size]))
        pos += size
        offs.append(pos)
    return (torch.tensor(toks, dtype=torch.int64, device=device),
            torch.tensor(offs, dtype=torch.int64, device=device))


# ----------------------------------------------------------------------------------------------
# Keep masks that may differ at near ties


def _check_cut(where: str, chosen: torch.Tensor, ref_chosen: torch.Tensor, scores: torch.Tensor,
               atol: float, rtol: float) -> None:
    """Same count as the reference, and the ``chosen`` set (dropped video, kept audio) the highest of
    the reference's ``scores`` up to the tolerance."""
    k, k_ref = int(chosen.sum()), int(ref_chosen.sum())
    if k != k_ref:
        raise AssertionError(f"{where}: keeps a different number of tokens than the reference ({k} vs {k_ref} chosen)")
    hi, lo = scores[chosen], scores[~chosen]
    if hi.numel() and lo.numel():
        worst, best = float(hi.min()), float(lo.max())
        if worst < best - (atol + rtol * abs(best)):
            raise AssertionError(
                f"{where}: chooses a token scored {worst:.8f} by the reference over one scored {best:.8f}: "
                f"beyond the tolerance (atol {atol}, rtol {rtol})")


def near_tie_differences(
    keep_mask: torch.Tensor,
    reference_keep_mask: torch.Tensor,
    reference_scores: torch.Tensor | None,
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    video_token_id: int,
    audio_token_id: int,
    selector_dtype: torch.dtype,
) -> int:
    """How many tokens a keep mask selects differently from the reference, all near ties.

    Two correct implementations can rank tokens whose scores are within rounding of each other
    differently: the release-style loop computes the video cosines in fp32 (the reference and the
    kernels in fp64, rounded to fp32), and a bf16/fp16 selector rounds differently in every
    implementation. This accepts exactly that and nothing else. Per frame: the same number of video
    tokens dropped, and the dropped set the highest reference cosines up to the ``"similarity"``
    tolerance of the embeddings' dtype; per scored chunk: the same number of audio tokens kept, the
    kept set the highest reference selector scores up to the ``"score"`` tolerance of
    ``selector_dtype``; every other token equal.

    Args:
        keep_mask, reference_keep_mask: bool ``[B, L]``.
        reference_scores: fp32 ``[B, L]`` the reference's ``audio_scores`` (None without a selector).
        inputs_embeds, input_ids, position_ids, attention_mask: the compressed batch.
        selector_dtype: the selector's parameter dtype (its score tolerance applies to audio).

    Returns:
        The number of tokens where the masks differ (0 when equal).

    Raises:
        AssertionError: a difference that is not a near tie (with where and by how much).
    """
    from ..reference import plan_row, spatial_scores, temporal_scores

    if keep_mask.shape != reference_keep_mask.shape:
        raise AssertionError(f"keep mask shape {tuple(keep_mask.shape)} != {tuple(reference_keep_mask.shape)}")
    keep, ref = keep_mask.cpu(), reference_keep_mask.cpu()
    diff = keep != ref
    if not diff.any():
        return 0
    v_atol, v_rtol = tolerance(inputs_embeds.dtype, "similarity")
    a_atol, a_rtol = tolerance(selector_dtype, "score")
    scores = None if reference_scores is None else reference_scores.detach().float().cpu()
    B, L = keep.shape
    valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    explained = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        if not diff[b].any():
            continue
        plan = plan_row(input_ids[b].cpu(), position_ids[0, b].cpu(), valid[b], video_token_id, audio_token_id)
        x = inputs_embeds[b].detach().cpu()
        for c, chunk in enumerate(plan.chunks):
            first = chunk.frames[0]
            frames = [(first, spatial_scores(x[first]) if diff[b, first].any() else None)]
            if len(chunk.frames) == 2:
                second = chunk.frames[1]
                paired = len(second) == len(first)
                sims = temporal_scores(x[second], x[first]) if paired and diff[b, second].any() else None
                frames.append((second, sims if paired else "unpaired"))
            for f, (pos, s) in enumerate(frames):
                if not diff[b, pos].any() or isinstance(s, str):
                    continue  # equal, or an unpruned frame (a difference there stays unexplained)
                _check_cut(f"row {b} chunk {c} frame {f}", ~keep[b, pos], ~ref[b, pos], s, v_atol, v_rtol)
                explained[b, pos] = True
            apos = chunk.audio
            if apos.numel() and diff[b, apos].any() and scores is not None:
                _check_cut(f"row {b} chunk {c} audio", keep[b, apos], ref[b, apos], scores[b, apos], a_atol, a_rtol)
                explained[b, apos] = True
    outside = diff & ~explained
    if outside.any():
        b, pos = (int(v) for v in outside.nonzero()[0])
        raise AssertionError(f"keep mask differs from the reference outside any frame or scored chunk cut, "
                             f"e.g. row {b} position {pos} ({int(outside.sum())} token(s))")
    return int(diff.sum())


def set_cpu_env(monkeypatch, name: str, value: str | None) -> None:
    """Sets (or, with None, removes) one of the extension's ``OMNISIFT_CPU_*`` variables through pytest's
    ``monkeypatch`` and makes the extension read its settings again (it reads them once otherwise)."""
    from .._ext import reload_cpu_settings

    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    reload_cpu_settings()
