"""The plugin inside vLLM's CPU engine, against stock vLLM and against ``OmniSIFTThinker``.

Every engine runs in its own process (``engine_run.py``); the compressed runs are compared with
transformers: same kept tokens (the prompt vLLM serves is the kept ids, exactly) and the same
log-probabilities (prompt and decode steps) within :data:`LOGPROB_ATOL`.
"""

from __future__ import annotations

import assets
import pytest
import torch

LOGPROB_ATOL = 1e-4

KINDS = ["video+audio", "video", "image", "text", "audio"]


def _req(kind, seed, **kw):
    return dict(kind=kind, seed=seed, **kw)


def _check_against_reference(reference, out: dict, request: dict, rho_video: float, rho_audio: float,
                             check_prompt_logprobs: bool = True) -> None:
    ref = reference.run(assets.request(**request), rho_video, rho_audio, out["gen_ids"])
    what = f"{request} at rho_video={rho_video}, rho_audio={rho_audio}"
    if (request.get("fps") or 2.0) >= 2.0 or request["kind"] != "video+audio":
        assert out["prompt_ids"] == ref["kept_ids"], f"kept tokens differ for {what}"
    else:
        # Below 2 fps the split of a chunk's kept audio around a frame is unknown before the encoders
        # (processor.compressed_video_ids): the same tokens, the order of the placeholder ids may differ.
        assert sorted(out["prompt_ids"]) == sorted(ref["kept_ids"]), f"kept tokens differ for {what}"
    if check_prompt_logprobs:
        worst = 0.0
        for i, entry in enumerate(out["prompt_logprobs"]):
            if entry is None:
                continue
            for tok, lp in entry.items():
                worst = max(worst, abs(float(ref["prompt_logprobs"][i - 1, tok]) - lp))
        assert worst <= LOGPROB_ATOL, f"prompt log-probabilities differ by {worst:.2e} for {what}"
    worst = 0.0
    for j, entry in enumerate(out["gen_logprobs"]):
        for tok, lp in entry.items():
            worst = max(worst, abs(float(ref["gen_logprobs"][j, tok]) - lp))
    assert worst <= LOGPROB_ATOL, f"decode log-probabilities differ by {worst:.2e} for {what}"
    assert out["gen_ids"] == ref["gen_logprobs"].argmax(-1).tolist(), f"greedy tokens differ for {what}"


def test_keep_all_equals_stock_vllm(run_engine, reference, stock_checkpoint):
    """rho = 0: the plugin serves what vLLM serves (text, image, video, standalone audio)."""
    requests = [_req(k, i) for i, k in enumerate(KINDS)]
    stock = run_engine({"plugin": False, "checkpoint": stock_checkpoint, "rounds": [requests]})
    # The checkpoint without selector weights: rho_audio = 0 never needs them.
    keep_all = run_engine({"omnisift": {"rho_video": 0.0, "rho_audio": 0.0}, "checkpoint": stock_checkpoint,
                           "rounds": [requests]})
    assert stock["architecture"] == keep_all["architecture"] == ["Qwen2_5OmniForConditionalGeneration"]
    for req, s, k in zip(requests, stock["rounds"][0], keep_all["rounds"][0]):
        if req["kind"] == "video+audio":
            # vLLM 0.32's own ids for a video with its sound track are shifted against transformers'
            # (see omnisift_kernels.integrations.vllm); the plugin follows transformers.
            _check_against_reference(reference, k, req, 0.0, 0.0)
            continue
        assert k["prompt_ids"] == s["prompt_ids"], req
        assert k["gen_ids"] == s["gen_ids"], req
        for a, b in zip(k["prompt_logprobs"][1:], s["prompt_logprobs"][1:]):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) <= 1e-5 for t in a), req


def test_compressed_batch_equals_omnisift_thinker(run_engine, reference):
    """One engine, requests of every kind and length in one batch (the default multiprocess engine:
    the plugin loads in the API process, the engine core and the worker), videos at 4, 2, 1 and 0.5 fps
    (0.5, 1, 2 and 4 seconds per temporal grid)."""
    kinds = [_req(k, i) for i, k in enumerate(KINDS)] + [
        _req("video+audio", 7, frames=12, text="and the sound?"), _req("two-videos", 9)]
    requests = kinds + [_req("video+audio", 13, frames=8, fps=4.0), _req("video+audio", 15, frames=8, fps=1.0),
                        _req("video+audio", 17, frames=8, fps=0.5, text="slow")]
    out = run_engine({"omnisift": {"rho_video": 0.7, "rho_audio": 0.3}, "rounds": [requests],
                      "engine": {"max_num_batched_tokens": 4096},
                      "error_requests": [_req("two-videos", 11, frames=6)]})
    for req, o in zip(requests, out["rounds"][0]):
        _check_against_reference(reference, o, req, 0.7, 0.3)
    assert len({len(o["prompt_ids"]) for o in out["rounds"][0][: len(kinds)]}) == len(kinds)
    full = reference.run(assets.request(**requests[0]), 0.0, 0.0, [0])["kept_ids"]
    assert len(out["rounds"][0][0]["prompt_ids"]) < 0.6 * len(full)
    # A first video of 3 temporal grids would pair its last frame with the next video's first.
    assert out["errors"][0] is not None and "odd number of temporal grids" in out["errors"][0]


def test_chunked_prefill_small_budget(run_engine, reference):
    """max_num_batched_tokens=64: every media span is prefilled over several steps."""
    requests = [_req("video+audio", 0), _req("video", 1), _req("image", 2)]
    out = run_engine({"omnisift": {"preset": "paper-25"}, "rounds": [requests],
                      "engine": {"max_num_batched_tokens": 64, "enable_chunked_prefill": True}})
    assert out["max_num_batched_tokens"] == 64
    assert max(len(o["prompt_ids"]) for o in out["rounds"][0]) > 3 * 64
    for req, o in zip(requests, out["rounds"][0]):
        _check_against_reference(reference, o, req, 0.77, 0.5)


def test_prefix_caching_repeated_media(run_engine, reference):
    """The same video and track again hit the prefix cache and give the same result; the same video
    with another track is another item (the hash covers the pairing). No settings given: the
    checkpoint holds selector weights, so it is served at the release's ratios (0.7 / 0.3)."""
    first = _req("video+audio", 0)
    other_text = _req("video+audio", 0, text="describe the sound")
    other_track = _req("video+audio", 0, audio_seed=5)
    out = run_engine({"prompt_logprobs": False, "engine": {"enable_prefix_caching": True},
                      "rounds": [[first], [first], [other_text], [other_track]]})
    (a,), (b,), (c,), (d,) = out["rounds"]
    assert b["num_cached_tokens"] > 0 and c["num_cached_tokens"] > 0
    assert b["gen_ids"] == a["gen_ids"] and b["prompt_ids"] == a["prompt_ids"]
    for x, y in zip(a["gen_logprobs"], b["gen_logprobs"]):
        assert all(abs(x[t] - y[t]) <= 1e-5 for t in x)
    for req, o in ((first, a), (first, b), (other_text, c), (other_track, d)):
        _check_against_reference(reference, o, req, 0.7, 0.3, check_prompt_logprobs=False)
    assert d["prompt_ids"] != a["prompt_ids"] or d["gen_logprobs"] != a["gen_logprobs"]


def test_bad_ratio_fails_engine_start(run_engine):
    """A ratio outside [0, 1) stops the engine with the error naming the setting."""
    with pytest.raises(AssertionError, match=r"hf_overrides\['omnisift'\]\['rho_video'\] must be in \[0, 1\)"):
        run_engine({"omnisift": {"rho_video": 1.0}, "rounds": []})


def test_missing_selector_weights_fail_engine_start(run_engine, stock_checkpoint):
    with pytest.raises(AssertionError, match=r"no selector weights \(thinker\.compressor\.\*"):
        run_engine({"omnisift": {"rho_video": 0.7, "rho_audio": 0.3}, "checkpoint": stock_checkpoint, "rounds": []})
