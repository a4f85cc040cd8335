"""The real Qwen2.5-Omni input pipeline end to end: processor, mp4 files, OmniSIFTThinker, infer and train.

Everything is built offline (``tests/qwen_omni_assets.py``): a ``Qwen2_5OmniProcessor`` made of
transformers' own classes, a tiny random thinker whose special ids come from its tokenizer, and short
mp4 clips of moving squares with a 16 kHz sound track. The reference is always the native
transformers thinker on the same processor outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

import qwen_omni_assets as assets  # noqa: E402

assets.prepare_torchvision()
pytest.importorskip("torchvision")

from omnisift_kernels.integrations import qwen2_5_omni_inputs as qi  # noqa: E402
from omnisift_kernels.integrations.qwen2_5_omni import OmniSIFTThinker  # noqa: E402
from omnisift_kernels.reference.compress import num_removed  # noqa: E402
from omnisift_kernels.testing.qwen2_5_omni import tiny_thinker_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "python", "infer.py")
TRAIN = os.path.join(ROOT, "python", "train.py")


# ---------------------------------------------------------------------------------------------
# Fixtures: one processor, thinker and set of media files for the module
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("omni_media")
    return {
        "clip4": assets.write_clip(str(d / "clip4.mp4"), seconds=4.0, seed=0),
        "clip2": assets.write_clip(str(d / "clip2.mp4"), seconds=2.0, seed=1),
        "silent": assets.write_clip(str(d / "silent.mp4"), seconds=2.0, audio=False, seed=2),
        "wav": assets.write_wav(str(d / "tone.wav"), seconds=2.0),
        "png": assets.write_image(str(d / "blocks.png")),
        "dir": d,
    }


@pytest.fixture(scope="module")
def processor():
    return assets.build_processor()


@pytest.fixture(scope="module")
def thinker(processor):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(assets.build_thinker_config(processor.tokenizer)).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return assets.build_checkpoint(str(tmp_path_factory.mktemp("omni_ckpt")), seed=0)


def wrap(thinker, rho_video=0.0, rho_audio=0.0, seed=1, **kw):
    torch.manual_seed(seed)
    return OmniSIFTThinker(thinker, rho_video=rho_video, rho_audio=rho_audio, **kw)


def prompt(processor, *, video=None, image=None, audio=None, text="What happens?"):
    conv = qi.conversation(text, video=video, image=image, audio=audio)
    return processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


def run_processor(processor, *, videos=(), aiv=True, images=(), audios=(), texts=None, **kw):
    """Processor outputs for clips given as paths (one prompt per video, or ``texts``)."""
    decoded = [qi.read_video(p, with_audio=aiv) for p in videos]
    if texts is None:
        texts = [prompt(processor, video=p) for p in videos]
    tracks = [t for _, t in decoded]
    use = aiv and bool(decoded) and all(t is not None for t in tracks)
    out = qi.processor_inputs(
        processor, texts if len(texts) > 1 else texts[0], videos=[f for f, _ in decoded],
        video_audio=tracks if use else None, images=[qi.read_image(p) for p in images],
        audio=[qi.read_audio(p) for p in audios], use_audio_in_video=use, **kw)
    return out


def with_answer(inputs, tokenizer, answer="the cat in"):
    """Appends a supervised answer to every row (right of the prompt, before any right padding)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    a = torch.tensor(ids)[None].expand(inputs["input_ids"].shape[0], -1)
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], a], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(a)], 1)
    labels = torch.full_like(inputs["input_ids"], -100)
    out_labels = torch.cat([labels, a], 1)
    return out, out_labels


def count(inputs, token_id):
    return (inputs["input_ids"] == token_id).sum(-1).tolist()


# ---------------------------------------------------------------------------------------------
# Processor -> OmniSIFTThinker forward
# ---------------------------------------------------------------------------------------------
def test_processor_layout(processor, thinker, media):
    """The processor's ids match the config: a video with its track is <|vision_bos|><|audio_bos|>...;
    4 s at 2 fps = 4 temporal grids, 25 audio tokens per second."""
    cfg = thinker.config
    inp = run_processor(processor, videos=[media["clip4"]])
    assert inp["use_audio_in_video"] is True
    ids = inp["input_ids"][0]
    assert int(inp["video_grid_thw"][0, 0]) == 4
    assert 100 <= count(inp, cfg.audio_token_id)[0] <= 102
    start = int((ids == cfg.vision_start_token_id).nonzero()[0])
    assert int(ids[start + 1]) == cfg.audio_start_token_id
    assert bool(OmniSIFTThinker(thinker).audio_in_video_mask(inp["input_ids"])[inp["input_ids"] == cfg.audio_token_id].all())


@pytest.mark.parametrize("aiv", [True, False])
def test_keep_all_equals_native(processor, thinker, media, aiv):
    inp = run_processor(processor, videos=[media["clip4"]], aiv=aiv)
    inp, labels = with_answer(inp, processor.tokenizer)
    w = wrap(thinker)
    with torch.no_grad():
        ref = thinker(**inp, labels=labels, use_cache=False)
        out = w(**inp, labels=labels)
    assert torch.equal(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)


def test_paper35_compresses_and_trains(processor, thinker, media):
    cfg = thinker.config
    inp = run_processor(processor, videos=[media["clip4"]])
    inp, labels = with_answer(inp, processor.tokenizer)
    w = wrap(thinker, preset="paper-35")
    assert (w.rho_video, w.rho_audio) == (0.67, 0.4)
    w.train()
    out = w(**inp, labels=labels)
    st = w.last_stats
    grid = inp["video_grid_thw"][0].tolist()
    per_frame = grid[1] * grid[2] // 4
    assert st["video_total"] == [grid[0] * per_frame]
    assert st["video_kept"] == [grid[0] * (per_frame - num_removed(per_frame, 0.67))]
    # Audio: per 2-second chunk (50 tokens, the last one takes the rest), n - floor(0.4 n) kept.
    n_audio = count(inp, cfg.audio_token_id)[0]
    sizes = [50] * (n_audio // 50 - 1) + [n_audio - 50 * (n_audio // 50 - 1)]
    assert st["audio_total"] == [n_audio]
    assert st["audio_kept"] == [sum(n - num_removed(n, 0.4) for n in sizes)]
    assert 0.3 < st["retention"] < 0.45
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in w.selector.named_parameters()}
    assert len(grads) == 18
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    w.zero_grad(set_to_none=True)
    w.eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padded_and_packed_equal_native(processor, thinker, media, side):
    """Two clips (4 s and 2 s) in one processor call; padded and packed keep-all forward = native."""
    cfg = thinker.config
    inp = run_processor(processor, videos=[media["clip4"], media["clip2"]], padding_side=side)
    ids = inp["input_ids"]
    media_ids = torch.tensor([cfg.audio_token_id, cfg.video_token_id])
    labels = ids.masked_fill((inp["attention_mask"] == 0) | torch.isin(ids, media_ids), -100)
    w = wrap(thinker)
    with torch.no_grad():
        ref = thinker(**inp, labels=labels, use_cache=False)
        out = w(**inp, labels=labels)
        packed = w(**inp, labels=labels, layout="packed")
    valid = inp["attention_mask"].bool()
    torch.testing.assert_close(out.logits[out.attention_mask.bool()], ref.logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.logits[0], ref.logits[valid], atol=1e-5, rtol=1e-5)
    # Logits agree to ~1e-5 (sdpa over a different padding); the mean loss follows them.
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_mm_token_type_ids_accepted(processor, thinker, media):
    try:
        inp = run_processor(processor, videos=[media["clip2"]], return_mm_token_type_ids=True)
    except (TypeError, ValueError) as e:  # older processors may not offer the option
        pytest.skip(f"this processor has no return_mm_token_type_ids: {e}")
    if "mm_token_type_ids" not in inp:
        pytest.skip("this processor does not return mm_token_type_ids")
    w = wrap(thinker)
    with torch.no_grad():
        ref = thinker(**inp, use_cache=False)
        out = w(**inp)
    assert torch.equal(out.logits, ref.logits)
    new = w.generate(**inp, max_new_tokens=2, do_sample=False)
    assert new.shape == (1, 2)


# ---------------------------------------------------------------------------------------------
# Generate
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_batched_equals_rows(processor, thinker, media, side):
    clips = [media["clip4"], media["clip2"]]
    batch = run_processor(processor, videos=clips, padding_side=side)
    w = wrap(thinker, 0.67, 0.4)
    new = w.generate(**batch, max_new_tokens=4, do_sample=False)
    for b, clip in enumerate(clips):
        row = run_processor(processor, videos=[clip])
        assert torch.equal(new[b], w.generate(**row, max_new_tokens=4, do_sample=False)[0]), f"row {b}"
    # Keep-all generate = the native thinker's on the left-padded batch (the native thinker cannot decode
    # a right-padded batch; the wrapper left-pads its compressed prompt whatever the input's side).
    keep = wrap(thinker)
    left = run_processor(processor, videos=clips, padding_side="left")
    ref = thinker.generate(**left, max_new_tokens=4, do_sample=False)[:, left["input_ids"].shape[1]:]
    assert torch.equal(keep.generate(**batch, max_new_tokens=4, do_sample=False), ref)


# ---------------------------------------------------------------------------------------------
# Modality mixes
# ---------------------------------------------------------------------------------------------
def _mix(processor, media, name):
    if name == "video_only":
        return run_processor(processor, videos=[media["silent"]]), "video"
    if name == "video_no_aiv":
        return run_processor(processor, videos=[media["clip2"]], aiv=False), "video"
    if name == "audio_only":
        return run_processor(processor, audios=[media["wav"]], texts=[prompt(processor, audio=media["wav"])]), None
    if name == "image":
        return run_processor(processor, images=[media["png"]], texts=[prompt(processor, image=media["png"])]), None
    if name == "text_only":
        return run_processor(processor, texts=[prompt(processor)]), None
    if name == "video_image_audio":  # a video with its track, an image and a separate audio clip
        text = prompt(processor, video=media["clip2"], image=media["png"], audio=media["wav"])
        return run_processor(processor, videos=[media["clip2"]], images=[media["png"]], audios=[media["wav"]],
                             texts=[text]), "video"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["video_only", "video_no_aiv", "audio_only", "image", "text_only",
                                  "video_image_audio"])
def test_modality_mixes(processor, thinker, media, name):
    cfg = thinker.config
    inp, kind = _mix(processor, media, name)
    inp, labels = with_answer(inp, processor.tokenizer)
    keep = wrap(thinker)
    with torch.no_grad():
        ref = thinker(**inp, labels=labels, use_cache=False)
        out = keep(**inp, labels=labels)
    assert torch.equal(out.logits, ref.logits)
    w = wrap(thinker, 0.5, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            w(**inp, labels=labels)
    messages = " ".join(str(c.message) for c in caught)
    st = w.last_stats
    separate = sum(st["audio_separate"])
    if kind is None:
        assert st["kept_length"] == st["original_length"]
        assert "no video" in messages
    else:
        assert st["video_kept"][0] < st["video_total"][0]
    n_audio = count(inp, cfg.audio_token_id)[0]
    if name in ("audio_only", "video_image_audio"):
        assert separate > 0 and "never compressed" in messages
    if name == "video_image_audio":
        # The video's own track is compressed, the separate clip is kept whole.
        assert st["audio_kept"][0] < st["audio_total"][0] == n_audio
        assert st["audio_kept"][0] >= separate
    new = w.generate(**{k: v for k, v in inp.items()}, max_new_tokens=2, do_sample=False)
    assert new.shape == (1, 2)


def test_mixed_batch(processor, thinker, media):
    """One processor call, three rows: a clip with its track, an image, text only (left padding)."""
    texts = [prompt(processor, video=media["clip2"]), prompt(processor, image=media["png"]), prompt(processor)]
    frames, track = qi.read_video(media["clip2"])
    inp = qi.processor_inputs(processor, texts, videos=[frames], video_audio=[track],
                              images=[qi.read_image(media["png"])])
    keep = wrap(thinker)
    with torch.no_grad():
        ref = thinker(**inp, use_cache=False)
        out = keep(**inp)
    valid = inp["attention_mask"].bool()
    torch.testing.assert_close(out.logits[out.attention_mask.bool()], ref.logits[valid], atol=1e-5, rtol=1e-5)
    ref_gen = thinker.generate(**inp, max_new_tokens=3, do_sample=False)[:, inp["input_ids"].shape[1]:]
    assert torch.equal(keep.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)
    w = wrap(thinker, 0.67, 0.4)
    new = w.generate(**inp, max_new_tokens=3, do_sample=False)
    st = w.last_stats
    assert st["video_kept"][0] < st["video_total"][0] and st["audio_kept"][0] < st["audio_total"][0]
    assert st["kept_length"][1:] == st["original_length"][1:]
    row = run_processor(processor, videos=[media["clip2"]])
    assert torch.equal(new[0], w.generate(**row, max_new_tokens=3, do_sample=False)[0])


def test_separate_audio_order_does_not_change_retention(processor, thinker, media):
    """use_audio_in_video=False: the clip's track as its own block before or after the video keeps the
    same audio (all of it) and prunes the same video tokens."""
    frames, track = qi.read_video(media["clip2"])
    stats = []
    for audio_first in (False, True):
        conv = qi.conversation("What happens?", video=media["clip2"], audio=media["clip2"])
        if audio_first:
            items = conv[-1]["content"]
            conv[-1]["content"] = [items[1], items[0], items[2]]
        text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        inp = qi.processor_inputs(processor, text, videos=[frames], audio=[track], use_audio_in_video=False)
        w = wrap(thinker, 0.67, 0.4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                w(**inp)
        stats.append({k: w.last_stats[k] for k in ("video_kept", "video_total", "audio_kept", "audio_total",
                                                    "retention")})
    assert stats[0] == stats[1]
    assert stats[0]["audio_kept"] == stats[0]["audio_total"]


def test_config_mismatch_warns(processor, media):
    """A config whose vision_start_token_id is not the tokenizer's: a warning, not silent no-pruning."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    cfg = assets.build_thinker_config(processor.tokenizer)
    cfg.vision_start_token_id = processor.tokenizer.convert_tokens_to_ids("<|box_end|>")
    torch.manual_seed(0)
    bad = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    inp = run_processor(processor, videos=[media["clip2"]])
    w = wrap(bad, 0.67, 0.4)
    with pytest.warns(UserWarning, match="do not match the tokenizer"):
        with torch.no_grad():
            w(**inp)


def test_flag_disagreement_warns(processor, thinker, media):
    inp = run_processor(processor, videos=[media["clip2"]])
    inp["use_audio_in_video"] = False
    with pytest.warns(UserWarning, match="use_audio_in_video=False"):
        with torch.no_grad():
            wrap(thinker, 0.5, 0.5).merge_modalities(**{k: v for k, v in inp.items()})


def test_preset_on_wrapper(thinker):
    w = OmniSIFTThinker(thinker, preset="paper-25")
    assert (w.rho_video, w.rho_audio) == (0.77, 0.5)
    assert (OmniSIFTThinker(thinker).rho_video, OmniSIFTThinker(thinker).rho_audio) == (0.7, 0.3)
    with pytest.raises(ValueError, match="preset"):
        OmniSIFTThinker(thinker, preset="paper-99")
    with pytest.raises(TypeError, match="preset"):
        OmniSIFTThinker(thinker, preset=35)


def test_tiny_config_takes_tokenizer_ids(processor):
    cfg = assets.build_thinker_config(processor.tokenizer)
    tok = processor.tokenizer
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|VIDEO|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_bos|>")
    assert cfg.get_text_config().vocab_size >= len(tok)
    with pytest.raises(ValueError, match="token_ids"):
        tiny_thinker_config(token_ids={"nope": 1})
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_thinker_config(vocab_size=64)


def test_render_prompt_without_template_matches_the_template(processor, media):
    """A processor without a chat template gets the release's format (the fixture's template is it)."""
    import copy

    conv = qi.conversation("What happens?", video=media["clip2"], image=media["png"], audio=media["wav"])
    bare = copy.copy(processor)
    bare.chat_template = None
    assert qi.render_prompt(bare, conv) == processor.apply_chat_template(conv, add_generation_prompt=True,
                                                                         tokenize=False)


def test_read_video_rules(media):
    frames, track = qi.read_video(media["clip4"])
    assert frames.shape[0] == 8 and frames.dtype.name == "uint8" and frames.shape[-1] == 3
    assert track is not None and abs(track.shape[0] / 16000 - 4.0) < 0.1
    frames, track = qi.read_video(media["silent"])
    assert track is None and frames.shape[0] == 4
    with pytest.raises(ValueError, match="read_video"):
        qi.read_video(str(media["dir"] / "missing.mp4"))
    with pytest.raises(ValueError, match="sound track"):
        qi.read_audio(media["silent"])


# ---------------------------------------------------------------------------------------------
# The programs, in subprocesses (the torchvision shim on PYTHONPATH, as a test-environment measure)
# ---------------------------------------------------------------------------------------------
def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=assets.subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("extra", [[], ["--no-audio-in-video"]])
def test_infer_video_file(checkpoint, media, tmp_path, extra):
    saved = str(tmp_path / "inputs.pt")
    out = _run([INFER, "--model", checkpoint, "--video", media["clip4"], "--preset", "paper-35",
                "--max-new-tokens", "3", "--repeats", "0", "--save-inputs", saved, *extra])
    assert "[infer] answer 0:" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("[infer] row 0:"))
    inputs = torch.load(saved, weights_only=True)
    grid = inputs["video_grid_thw"][0].tolist()
    per_frame = grid[1] * grid[2] // 4
    assert f"video {grid[0] * (per_frame - num_removed(per_frame, 0.67))}/{grid[0] * per_frame} kept" in line
    if extra:
        assert "audio 0/0 kept" in line and inputs["use_audio_in_video"] is False
    else:
        assert inputs["use_audio_in_video"] is True and "audio 0/0" not in line


def test_infer_full_model_checkpoint_mixed_media(media, tmp_path):
    """A full Qwen2_5OmniForConditionalGeneration checkpoint (thinker weights under thinker.*), with a
    video without its track, the track as separate audio and an image: video pruned, audio kept whole."""
    ckpt = assets.build_checkpoint(str(tmp_path / "full"), seed=3, full_model=True)
    out = _run([INFER, "--model", ckpt, "--video", media["clip2"], "--no-audio-in-video", "--audio", media["clip2"],
                "--image", media["png"], "--rho-video", "0.5", "--rho-audio", "0.5", "--max-new-tokens", "2",
                "--repeats", "0"])
    line = next(ln for ln in out.splitlines() if ln.startswith("[infer] row 0:"))
    kept, total = (int(x) for x in line.split("audio ")[1].split(" kept")[0].split("/"))
    assert kept == total > 0 and "separate, kept whole" in line
    video_kept, video_total = (int(x) for x in line.split("video ")[1].split(" kept")[0].split("/"))
    assert video_kept < video_total


def test_train_on_media_jsonl(checkpoint, media, tmp_path):
    rows = [
        {"video": media["clip4"], "prompt": "What happens?", "answer": "the cat in"},
        {"video": media["clip2"], "answer_ids": [5, 6, 7]},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _run([TRAIN, "--model", checkpoint, "--data", str(data), "--preset", "paper-35", "--steps", "2",
                "--batch-size", "2", "--save-dir", str(tmp_path / "ckpt"), "--no-progress", "--log-every", "1"])
    assert "[train] done: 2 steps" in out
    assert os.path.isfile(tmp_path / "ckpt" / "compressor.safetensors")
