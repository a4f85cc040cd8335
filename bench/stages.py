"""Per-stage timing hooks and the minimal-traffic model behind the GB/s column.

The stage hook
--------------
``STAGE_HOOKS[provider_name]`` is a *stage factory*: ``factory(case) -> {stage: fn}`` where ``case``
is a :class:`bench.cases.Case` (one input set) and every ``fn()`` runs one stage of that provider on
that input with the earlier stages' results precomputed by the factory. The CLI calls the factory
once per input set (outside the timed region) and times each ``fn`` with the input sets rotated.

Stage names (:data:`STAGES`, in pipeline order): ``plan`` (frames/chunks/windows from ids and time
ids), ``video_scores`` (spatial + temporal cosine), ``video_select`` (the per-frame cuts),
``video_scores+select`` (both, as one step: what a fused kernel does), ``selector`` (the audio
selector on every scored chunk), ``audio_select`` (the per-chunk audio cut),
``gather`` (compaction of the kept tokens: packed embeddings, positions, labels, indices).
``end_to_end`` is timed separately (the provider's whole call).

Filled here: ``reference`` (from ``omnisift_kernels.reference``'s building blocks) and
``release-loop`` (from :mod:`bench.release_loop`'s phases). The ``cpu`` and ``triton`` providers
time :func:`pipeline_stages` (the stage functions of ``omnisift_kernels.pipeline``, called one by one).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from omnisift_kernels.reference import (
    first_k_by_score,
    num_removed,
    plan_row,
    spatial_scores,
    temporal_scores,
)
from omnisift_kernels.ste import straight_through_keep

from . import release_loop as R

STAGES = ("plan", "video_scores", "video_select", "video_scores+select", "selector", "audio_select", "gather")
END_TO_END = "end_to_end"
FLOOR = "selector-projections floor"
ALL_OPS = STAGES + (END_TO_END, FLOOR)
# Stages whose minimal traffic is the point (compared with the measured copy bandwidth).
MEMORY_BOUND = {"video_scores", "video_scores+select", "gather", END_TO_END}

StageFactory = Callable[[Any], dict[str, Callable[[], Any]]]
STAGE_HOOKS: dict[str, StageFactory] = {}


def register_stage_hook(provider: str, factory: StageFactory) -> None:
    """Registers (or replaces) the stage factory of ``provider``."""
    STAGE_HOOKS[provider] = factory


# ------------------------------------------------------------------------------------ reference
def reference_stages(case) -> dict[str, Callable[[], Any]]:
    """The reference's stages, each a loop over rows and chunks like ``reference_compress``."""
    kw = case.kwargs()
    x, ids, pos = kw["inputs_embeds"], kw["input_ids"], kw["position_ids"]
    labels, sel = kw["labels"], kw["selector"]
    vid, aid, rv, ra = kw["video_token_id"], kw["audio_token_id"], kw["rho_video"], kw["rho_audio"]
    B, L, _ = x.shape
    valid = kw["attention_mask"].bool()

    def plan():
        return [plan_row(ids[b], pos[0, b], valid[b], vid, aid) for b in range(B)]

    plans = plan()
    chunks = [(b, ch) for b, p in enumerate(plans) for ch in p.chunks]

    def video_scores():
        out = []
        for b, ch in chunks:
            first = x[b][ch.frames[0]]
            s2 = None
            if len(ch.frames) == 2 and len(ch.frames[1]) == len(ch.frames[0]):
                s2 = temporal_scores(x[b][ch.frames[1]], first)
            out.append((spatial_scores(first), s2))
        return out

    scores = video_scores()

    def video_select(scores=scores):
        keep = valid.clone()
        for (b, ch), (s1, s2) in zip(chunks, scores):
            k = num_removed(len(ch.frames[0]), rv)
            keep[b, ch.frames[0][first_k_by_score(s1, k)]] = False
            if s2 is not None:
                keep[b, ch.frames[1][first_k_by_score(s2, k)]] = False
        return keep

    keep_v = video_select()
    jobs = []
    if sel is not None:
        for b, ch in chunks:
            if ch.audio.numel() < 2:
                continue
            surv = torch.cat([f[keep_v[b, f]] for f in ch.frames])
            if surv.numel():
                jobs.append((b, ch.audio, surv))

    def selector():
        return [sel(x[b][a], x[b][v]) for b, a, v in jobs]

    audio_sc = selector()

    def audio_select():
        keep = keep_v.clone()
        for (b, a, _), s in zip(jobs, audio_sc):
            n_keep = a.numel() - num_removed(a.numel(), ra)
            kept = a[first_k_by_score(s.float(), n_keep)]
            keep[b, a] = False
            keep[b, kept] = True
        return keep

    keep = audio_select()
    scored = torch.zeros(B, L, dtype=torch.bool, device=x.device)
    score_map = torch.zeros(B, L, dtype=torch.float32, device=x.device)
    for (b, a, _), s in zip(jobs, audio_sc):
        scored[b, a] = True
        score_map[b, a] = s.float()

    def gather():
        rows, rpos, rlab, ridx = [], [], [], []
        for b in range(B):
            p = torch.nonzero(keep[b]).flatten()
            row = x[b, p]
            ste = torch.nonzero(scored[b, p]).flatten()
            if sel is not None and ste.numel():
                row = row.index_copy(0, ste, straight_through_keep(row[ste], score_map[b, p[ste]]))
            rows.append(row)
            rpos.append(pos[:, b, p])
            rlab.append(labels[b, p])
            ridx.append(p + b * L)
        return torch.cat(rows), torch.cat(rpos, 1), torch.cat(rlab), torch.cat(ridx)

    return {
        "plan": plan, "video_scores": video_scores, "video_select": video_select,
        "video_scores+select": lambda: video_select(video_scores()),
        "selector": selector, "audio_select": audio_select, "gather": gather,
        "_keep_mask": lambda: keep,  # for the agreement check of the stage chain, never timed
    }


# --------------------------------------------------------------------------------- release loop
def release_loop_stages(case) -> dict[str, Callable[[], Any]]:
    """The release-style loop's phases, each run over every row and chunk."""
    kw = case.kwargs()
    x, ids, pos = kw["inputs_embeds"], kw["input_ids"], kw["position_ids"]
    labels, sel = kw["labels"], kw["selector"]
    vid, aid, rv, ra = kw["video_token_id"], kw["audio_token_id"], kw["rho_video"], kw["rho_audio"]
    B = x.shape[0]
    valid = kw["attention_mask"].bool()

    def plan():
        out = []
        for b in range(B):
            lay = R.row_layout(ids[b], pos[0, b], valid[b], vid, aid)
            out.append([(b, R.chunk_tokens(lay, c)) for c in range(R.num_chunks(lay))])
        return out

    chunks = [bc for row in plan() for bc in row]

    def video_scores():
        return [R.video_chunk_scores(x[b], ch) for b, ch in chunks]

    scores = video_scores()

    def video_select(scores=scores):
        keep = valid.clone()
        survivors = []
        for (b, ch), (s1, s2) in zip(chunks, scores):
            k = int(ch.first.numel() * rv)
            k1 = R.drop_by_topk(s1, k)
            keep[b, ch.first[~k1]] = False
            surv = [ch.first[k1]]
            if ch.second is not None:
                if s2 is not None:
                    k2 = R.drop_by_topk(s2, k)
                    keep[b, ch.second[~k2]] = False
                    surv.append(ch.second[k2])
                else:
                    surv.append(ch.second)
            survivors.append(torch.cat(surv))
        return keep, survivors

    keep_v, survivors = video_select()
    jobs = [(b, ch.audio, s) for (b, ch), s in zip(chunks, survivors)
            if sel is not None and ch.audio.numel() >= 2 and s.numel()]

    def selector():
        return [R.score_chunk_audio(sel, x[b], a, s) for b, a, s in jobs]

    audio_sc = selector()

    def audio_select():
        keep = keep_v.clone()
        for (b, a, _), s in zip(jobs, audio_sc):
            n_keep = a.numel() - int(a.numel() * ra)
            keep[b, a[~R.keep_by_topk(s, n_keep)]] = False
        return keep

    keep = audio_select()
    return {
        "plan": plan, "video_scores": video_scores, "video_select": video_select,
        "video_scores+select": lambda: video_select(video_scores()),
        "selector": selector, "audio_select": audio_select,
        "gather": lambda: R.gather_rows(x, pos, keep, labels),
        "_keep_mask": lambda: keep,
    }


register_stage_hook("reference", reference_stages)
register_stage_hook("release-loop", release_loop_stages)


def pipeline_stages(case, backend: str) -> dict[str, Callable[[], Any]]:
    """The stages of ``omnisift_kernels.pipeline.fast_compress``, called one by one.

    ``plan`` = ``build_plan`` + ``read_sizes`` (the call's one host read) + ``index_plan``;
    ``video_scores+select`` = ``video_keep`` (fused scores and segmented selection), on the CPU with
    the extension ``video_keep_gather`` (which also gathers the survivors' rows for the selector,
    as the end-to-end call does); ``selector`` = ``audio_scores``; ``audio_select`` = ``audio_keep``; ``gather`` = ``assemble`` (keep mask, gather
    with the STE, positions, labels, cu_seqlens), packed output.
    """
    from omnisift_kernels import pipeline as PL
    from omnisift_kernels.plan import build_plan, read_sizes

    kw = case.kwargs()
    x, ids, pos = kw["inputs_embeds"], kw["input_ids"], kw["position_ids"]
    labels, sel = kw["labels"], kw["selector"]
    valid = kw["attention_mask"].bool()

    def plan():
        p = build_plan(ids, pos[0], valid, video_token_id=kw["video_token_id"], audio_token_id=kw["audio_token_id"],
                       rho_video=kw["rho_video"], rho_audio=kw["rho_audio"], score_audio=sel is not None)
        sizes = read_sizes(p, None)
        return p, sizes, PL.index_plan(p, sizes)

    p, sizes, index = plan()
    run_selector = sel is not None and sizes.num_audio_assigned and sizes.num_chunks
    # As fast_compress does: on the CPU with the extension, the video stage also gathers the
    # survivors' rows for the selector (video_keep_gather), and the selector stage takes them.
    fused = backend == "cpu" and run_selector and PL.keep_gather_serves(x, "cpu")

    def video():
        if fused:
            return PL.video_keep_gather(x, index, PL.selector_rows_dtype(x, sel))
        return PL.video_keep(x, index)

    keep_v, video_rows = video() if fused else (video(), None)

    def selector():
        if fused:
            return PL.audio_scores(x, sel, p, sizes, index, keep_v, video_rows=video_rows)
        return PL.audio_scores(x, sel, p, sizes, index, keep_v)

    scores = selector() if run_selector else None

    def audio_select():
        return PL.audio_keep(index, sizes, scores)

    keep_a = audio_select()

    def gather():
        return PL.assemble(x, pos, labels, p, sizes, index, keep_v, keep_a, scores, "packed",
                           with_selector=sel is not None)

    out = {"plan": plan, "video_scores+select": video, "audio_select": audio_select, "gather": gather,
           "_keep_mask": lambda: gather().keep_mask}
    if run_selector:
        out["selector"] = selector
    return out


def floor_callable(case, keep_mask, library: bool = False) -> Callable[[], Any]:
    """The two selector projections as two matmuls: over the surviving video tokens (``keep_mask``
    of the reference) and all audio tokens, the least any implementation of the selector computes.

    ``library``: with :func:`omnisift_kernels.cpu_gemm.linear` (the GEMM the fast path uses on the
    CPU) instead of ``F.linear``; rows already in the dtype that GEMM reads."""
    kw = case.kwargs()
    sel = kw["selector"]
    x, ids = kw["inputs_embeds"], kw["input_ids"]
    valid = kw["attention_mask"].bool()
    dt = sel.v_proj.weight.dtype
    linear = F.linear
    if library:
        from omnisift_kernels.cpu_gemm import linear
        from omnisift_kernels.pipeline import selector_rows_dtype

        dt = selector_rows_dtype(x, sel)
    video = x[(ids == kw["video_token_id"]) & valid & keep_mask].to(dt).contiguous()
    audio = x[(ids == kw["audio_token_id"]) & valid].to(dt).contiguous()
    wv, bv, wa, ba = sel.v_proj.weight, sel.v_proj.bias, sel.a_proj.weight, sel.a_proj.bias

    def floor():
        return linear(video, wv, bv), linear(audio, wa, ba)

    return floor


# ------------------------------------------------------------------------------ traffic model
def traffic(op: str, info: dict) -> tuple[float | None, float | None]:
    """``(minimal bytes, flops)`` of ``op`` (None when not meaningful).

    ``info``: ``B, L, D, valid, video, audio, video_kept, audio_kept, kept`` (all kept tokens, text
    included), ``elem`` (embedding bytes), ``sel_elem`` (selector parameter bytes), ``H``, ``scored_audio``
    (audio tokens the selector scores), ``surviving_video`` (video tokens it attends to), ``sel_params``.
    Minimal = every input byte the stage needs read once, every output byte written once.
    """
    D, e = info["D"], info["elem"]
    V, A = info["video"], info["audio"]
    H, se = info["H"], info["sel_elem"]
    if op == "plan":  # ids + time ids + mask read, chunk metadata negligible
        return info["B"] * info["L"] * (8 + 8 + 8), None
    if op in ("video_scores", "video_scores+select"):
        return V * D * e + V * 4, 3 * 2 * V * D
    if op == "video_select":
        return V * 4 + V, None
    if op == "selector":
        n = info["scored_audio"] + info["surviving_video"]
        return n * D * e + info["sel_params"] * se + info["scored_audio"] * 4, 2 * n * D * H
    if op == "audio_select":
        return A * 4 + A, None
    if op == "gather":  # kept rows read + written, positions (3) + labels + index written
        T = info["kept"]
        return 2 * T * D * e + T * (3 * 8 + 8 + 8), None
    if op == END_TO_END:  # the whole valid input read once, the packed output written once
        return info["valid"] * D * e + info["kept"] * D * e, None
    if op == FLOOR:  # the projections of the surviving video and all audio tokens
        n = info["video_kept"] + A
        return n * D * se + 2 * (D * H + H) * se + n * H * se, 2 * n * D * H
    return None, None
