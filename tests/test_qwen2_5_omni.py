"""OmniSIFTThinker on a tiny random Qwen2.5-Omni thinker (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from omnisift_kernels import synthetic as syn  # noqa: E402
from omnisift_kernels.reference.compress import num_removed  # noqa: E402
from omnisift_kernels.selector import VisionGuidedAudioSelector, count_parameters  # noqa: E402
from omnisift_kernels.integrations import qwen2_5_omni as q  # noqa: E402
from omnisift_kernels.integrations.qwen2_5_omni import (  # noqa: E402
    OmniSIFTThinker,
    check_transformers_version,
    load_compressor_from_checkpoint,
    load_compressor_weights,
    wrap_omni_model,
)
from omnisift_kernels.testing.qwen2_5_omni import (  # noqa: E402
    TINY_IDS,
    build_inputs,
    tiny_random_thinker,
    tiny_thinker_config,
)

V, A, T, I = syn.Video, syn.Audio, syn.Text, syn.Image
# Two rows of different lengths: text, video with audio (4 s and 3 s), text.
AV_ROWS = [[T(5), V(4, 2, 2), T(3)], [T(3), V(3, 2, 2), T(2)]]


@pytest.fixture
def thinker():
    return tiny_random_thinker(seed=0)


def wrap(thinker, rho_video=0.0, rho_audio=0.0, seed=1, backend="auto"):
    torch.manual_seed(seed)
    return OmniSIFTThinker(thinker, rho_video=rho_video, rho_audio=rho_audio, backend=backend)


def split_labels(inp):
    inp = dict(inp)
    return inp, inp.pop("labels", None)


def native_kwargs(inp):
    """Processor outputs for the native thinker (which needs use_audio_in_video spelt out)."""
    has_av = bool(((inp["input_ids"][:, :-1] == TINY_IDS["vision_start_token_id"])
                   & (inp["input_ids"][:, 1:] == TINY_IDS["audio_start_token_id"])).any())
    return dict(inp, use_audio_in_video=has_av)


# ---------------------------------------------------------------------------------------------
# State dict layout and weight loading
# ---------------------------------------------------------------------------------------------
def test_state_dict_layout_matches_release(thinker):
    w = wrap(thinker, 0.5, 0.5)
    sel_keys = set(VisionGuidedAudioSelector(32).state_dict())
    keys = set(w.state_dict())
    comp = {k for k in keys if "compressor" in k}
    assert comp == {f"thinker.compressor.{k}" for k in sel_keys}
    assert "thinker.compressor.v_proj.weight" in keys
    assert "thinker.compressor.cross_attn.in_proj_weight" in keys
    assert "thinker.compressor.score_head.2.weight" in keys
    # The compressor module is not registered (no duplicate selector keys under another name).
    assert not any("selector" in k for k in keys)
    assert w.selector is thinker.compressor is w.compressor.selector
    assert sum(1 for _ in w.parameters()) == sum(1 for _ in thinker.parameters())


def test_full_model_release_roundtrip(tmp_path):
    """wrap_omni_model on the full model: save_pretrained writes thinker.compressor.*, which loads back."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    cfg = Qwen2_5OmniConfig(thinker_config=tiny_thinker_config().to_dict(), enable_audio_output=False)
    torch.manual_seed(0)
    full = Qwen2_5OmniForConditionalGeneration(cfg)
    w = wrap_omni_model(full, rho_video=0.5, rho_audio=0.5)
    assert w.thinker is full.thinker
    assert "thinker.compressor.v_proj.weight" in full.state_dict()
    full.save_pretrained(tmp_path)
    torch.manual_seed(1)
    full2 = Qwen2_5OmniForConditionalGeneration(cfg)
    w2 = wrap_omni_model(full2)
    assert not torch.equal(w2.selector.v_proj.weight, w.selector.v_proj.weight)
    load_compressor_from_checkpoint(w2, str(tmp_path))
    for (k, a), (_, b) in zip(w.selector.state_dict().items(), w2.selector.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("prefix", ["thinker.compressor.", "compressor.", "module.thinker.compressor.", ""])
def test_load_compressor_weights_prefixes(thinker, prefix):
    w = wrap(thinker)
    torch.manual_seed(5)
    src = VisionGuidedAudioSelector(32)
    sd = {prefix + k: v.clone() for k, v in src.state_dict().items()}
    if prefix.startswith(("thinker", "module")):
        sd["thinker.model.language_model.norm.weight"] = torch.ones(32)  # other keys of a full checkpoint
    load_compressor_weights(w, sd)
    for k, v in src.state_dict().items():
        assert torch.equal(w.selector.state_dict()[k], v)
    assert torch.equal(thinker.state_dict()["compressor.v_proj.weight"], src.v_proj.weight)


def test_release_shapes_at_3584(thinker):
    sel = VisionGuidedAudioSelector(3584)
    assert count_parameters(sel) == 4_856_321
    sd = {f"thinker.compressor.{k}": v for k, v in sel.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["thinker.compressor.v_proj.weight"] == (512, 3584)
    assert shapes["thinker.compressor.cross_attn.in_proj_weight"] == (1536, 512)
    assert shapes["thinker.compressor.score_head.0.weight"] == (256, 512)
    assert shapes["thinker.compressor.score_head.2.weight"] == (1, 256)
    w = wrap(thinker)  # D = 32: a 7B checkpoint must not load silently
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_compressor_weights(w, sd)


def test_selector_width_mismatch(thinker):
    with pytest.raises(ValueError, match="d_model"):
        OmniSIFTThinker(thinker, VisionGuidedAudioSelector(64))


# ---------------------------------------------------------------------------------------------
# Keep-all equals the native thinker
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_keep_all_forward_matches_native(thinker, padding_side):
    inp, labels = split_labels(build_inputs(thinker.config, AV_ROWS, answer=4, padding_side=padding_side))
    w = wrap(thinker, 0.0, 0.0)
    with torch.no_grad():
        ref = thinker(**native_kwargs(inp), labels=labels, use_cache=False)
        out = w(**inp, labels=labels)
    valid = inp["attention_mask"].bool()
    assert out.logits.shape[:2] == (2, int(valid.sum(-1).max()))
    torch.testing.assert_close(out.logits[out.attention_mask.bool()], ref.logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    assert w.last_stats["video_kept"] == w.last_stats["video_total"] == [16, 12]
    assert w.last_stats["audio_kept"] == w.last_stats["audio_total"] == [100, 75]


def test_keep_all_generate_matches_native(thinker):
    inp = build_inputs(thinker.config, AV_ROWS, padding_side="left")
    w = wrap(thinker, 0.0, 0.0)
    ref = thinker.generate(**native_kwargs(inp), max_new_tokens=6, do_sample=False)[:, inp["input_ids"].shape[1]:]
    got = w.generate(**inp, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, ref)
    # Sampling goes through the same generate: same seed, same tokens.
    torch.manual_seed(3)
    ref = thinker.generate(**native_kwargs(inp), max_new_tokens=6, do_sample=True, top_k=0, temperature=1.5)
    torch.manual_seed(3)
    got = w.generate(**inp, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.5)
    assert torch.equal(got, ref[:, inp["input_ids"].shape[1]:])


# ---------------------------------------------------------------------------------------------
# Compressed training
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compressed_forward_backward_reaches_selector(thinker, backend):
    inp, labels = split_labels(build_inputs(thinker.config, AV_ROWS, answer=4))
    w = wrap(thinker, 0.5, 0.5, backend=backend).train()
    for p in thinker.parameters():
        p.requires_grad_(False)
    for p in w.selector.parameters():
        p.requires_grad_(True)
    out = w(**inp, labels=labels)
    assert out.logits.shape[1] < inp["input_ids"].shape[1]
    out.loss.backward()
    for name, p in w.selector.named_parameters():
        assert p.grad is not None, name
    for name in ("v_proj.weight", "a_proj.weight", "cross_attn.in_proj_weight", "score_head.0.weight",
                 "score_head.2.weight", "score_head.2.bias"):
        assert w.selector.get_parameter(name).grad.abs().sum() > 0, name
    st = w.last_stats
    assert st["video_kept"] == [8, 6] and st["audio_kept"] == [50, 38]
    assert st["kept_length"] == [int(n) for n in out.attention_mask.sum(-1)]
    if backend == "auto":  # the fast path and the reference agree on loss and selector gradients
        grads = {n: p.grad.clone() for n, p in w.selector.named_parameters()}
        w.selector.zero_grad()
        w.compressor.backend = "reference"
        ref = w(**inp, labels=labels)
        ref.loss.backward()
        assert torch.equal(ref.keep_mask, out.keep_mask)
        torch.testing.assert_close(ref.loss, out.loss, atol=1e-6, rtol=1e-6)
        for n, p in w.selector.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)


def test_llm_trainable_gets_gradients(thinker):
    inp, labels = split_labels(build_inputs(thinker.config, AV_ROWS, answer=4))
    w = wrap(thinker, 0.5, 0.5).train()
    w(**inp, labels=labels).loss.backward()
    assert thinker.lm_head.weight.grad.abs().sum() > 0
    assert w.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    conv1 = next(p for n, p in thinker.named_parameters() if n.endswith("audio_tower.conv1.weight"))
    assert conv1.grad is not None and conv1.grad.abs().sum() > 0  # through the STE into the towers


def test_loss_equals_manual_loss_on_compacted_sequence(thinker):
    inp, labels = split_labels(build_inputs(thinker.config, AV_ROWS, answer=5))
    w = wrap(thinker, 0.5, 0.4)
    with torch.no_grad():
        out = w(**inp, labels=labels)
        keep = w.last_keep_mask
        B, L = labels.shape
        shifted = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], dim=1)  # shift BEFORE the gather
        rows_lab = [shifted[b][keep[b]] for b in range(B)]
        K = max(len(r) for r in rows_lab)
        manual_lab = torch.full((B, K), -100)
        for b, r in enumerate(rows_lab):
            manual_lab[b, : len(r)] = r
        assert torch.equal(out.shift_labels, manual_lab)
        # Supervised answer tokens all survive; each predicts its original successor.
        assert int((manual_lab != -100).sum()) == int((labels != -100).sum())
        # An independent forward on the compacted sequence and a plain cross entropy.
        embeds, pos, mask = w.merge_modalities(**inp)
        emb_c = torch.zeros(B, K, embeds.shape[-1])
        pos_c = torch.zeros(3, B, K, dtype=torch.long)
        mask_c = torch.zeros(B, K, dtype=torch.long)
        for b in range(B):
            n = int(keep[b].sum())
            emb_c[b, :n], pos_c[:, b, :n], mask_c[b, :n] = embeds[b][keep[b]], pos[:, b][:, keep[b]], 1
        logits = thinker(inputs_embeds=emb_c, position_ids=pos_c, attention_mask=mask_c, use_cache=False).logits
        manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), manual_lab.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.logits[out.attention_mask.bool()], logits[mask_c.bool()], atol=1e-5, rtol=1e-5)


def test_packed_layout_matches_right_padding(thinker):
    inp, labels = split_labels(build_inputs(thinker.config, AV_ROWS, answer=4))
    w = wrap(thinker, 0.5, 0.5)
    with torch.no_grad():
        right = w(**inp, labels=labels)
        packed = w(**inp, labels=labels, layout="packed")
    assert packed.logits.shape[:2] == (1, int(right.attention_mask.sum()))
    torch.testing.assert_close(packed.logits[0], right.logits[right.attention_mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.loss, right.loss, atol=1e-6, rtol=1e-6)


def test_ratios_per_call_and_validation(thinker):
    inp = build_inputs(thinker.config, AV_ROWS)
    w = wrap(thinker, 0.0, 0.0)
    with torch.no_grad():
        w(**inp, rho_video=0.75, rho_audio=0.3)
    st = w.last_stats
    per_frame = 4 - num_removed(4, 0.75)
    assert st["video_kept"] == [4 * per_frame, 3 * per_frame]
    # Row 0: 2 chunks of 50 audio; row 1: chunks of 50 and 25.
    assert st["audio_kept"] == [2 * (50 - num_removed(50, 0.3)), 50 - num_removed(50, 0.3) + 25 - num_removed(25, 0.3)]
    assert 0 < st["retention"] < 1
    with torch.no_grad():
        w(**inp)
    assert w.last_stats["audio_kept"] == w.last_stats["audio_total"]
    with pytest.raises(ValueError):
        w(**inp, rho_video=1.0)


# ---------------------------------------------------------------------------------------------
# Compressed generation
# ---------------------------------------------------------------------------------------------
def test_batched_generate_equals_per_row(thinker):
    rows = [[T(4), V(4, 2, 2), T(3)], [T(2), V(2, 2, 2), T(5)], [T(6), V(3, 2, 2), T(2)]]
    w = wrap(thinker, 0.5, 0.5)
    batch = build_inputs(thinker.config, rows, padding_side="left", seed=7)
    got = w.generate(**batch, max_new_tokens=6, do_sample=False)
    kept = w.last_stats["kept_length"]
    assert len(set(kept)) == 3  # different kept lengths per row
    for b, row in enumerate(rows):
        one = _row_of(batch, b)
        ref = w.generate(**one, max_new_tokens=6, do_sample=False)
        assert w.last_stats["kept_length"] == [kept[b]]
        assert torch.equal(got[b], ref[0]), (b, got[b], ref[0])


def _row_of(batch, b):
    """Row b of a hand-built batch, with its own media (one video with audio per row)."""
    valid = batch["attention_mask"][b].bool()
    grid = batch["video_grid_thw"]
    sizes = grid.prod(-1).tolist()
    start = sum(sizes[:b])
    return {
        "input_ids": batch["input_ids"][b][valid][None],
        "attention_mask": torch.ones(1, int(valid.sum()), dtype=torch.long),
        "input_features": batch["input_features"][b: b + 1],
        "feature_attention_mask": batch["feature_attention_mask"][b: b + 1],
        "pixel_values_videos": batch["pixel_values_videos"][start: start + sizes[b]],
        "video_grid_thw": grid[b: b + 1],
        "video_second_per_grid": batch["video_second_per_grid"][b: b + 1],
    }


def test_decode_positions_and_cache_lengths(thinker):
    inp = build_inputs(thinker.config, AV_ROWS, padding_side="left")
    w = wrap(thinker, 0.5, 0.5)
    # Independent expectation: max over the three TMRoPE rows of the kept tokens, per row.
    with torch.no_grad():
        _, pos, _ = w.merge_modalities(**inp)
    calls = []

    def hook(module, args, kwargs):
        pkv = kwargs.get("past_key_values", kwargs.get("cache"))  # renamed ``cache`` in transformers 5.24
        calls.append((kwargs["position_ids"].clone(), kwargs["attention_mask"].clone(),
                      pkv.get_seq_length() if pkv is not None else 0))

    h = w.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        steps = 5
        w.generate(**inp, max_new_tokens=steps, do_sample=False)
    finally:
        h.remove()
    keep = w.last_keep_mask
    max_kept = torch.stack([pos[:, b][:, keep[b]].max() for b in range(2)])
    K = max(w.last_stats["kept_length"])
    assert len(calls) == steps
    prefill_pos, prefill_mask, cache0 = calls[0]
    assert prefill_pos.shape == (4, 2, K) and prefill_mask.shape == (2, K) and cache0 == 0
    assert torch.equal(prefill_pos[1:].amax(dim=(0, 2)), max_kept)
    for b in range(2):  # the prefill carries the kept tokens' original TMRoPE ids (left padded)
        n = int(keep[b].sum())
        assert torch.equal(prefill_pos[1:, b, K - n:], pos[:, b][:, keep[b]])
    for s, (p, m, cache) in enumerate(calls[1:]):
        # 5.16+: [4, B, 1] extended by generate; 5.0-5.15: [3, B, 1] from rope_deltas.
        assert p.shape[1:] == (2, 1) and p.shape[0] in (3, 4)
        for r in range(p.shape[0] - 3, p.shape[0]):
            assert torch.equal(p[r, :, 0], max_kept + 1 + s), (s, r, p[:, :, 0], max_kept)
        assert cache == K + s and m.shape == (2, cache + 1)
    if q.generate_honors_position_ids(thinker):
        expected_delta = max_kept + 1 - torch.tensor(w.last_stats["kept_length"])
        assert torch.equal(q._rope_holder(thinker).rope_deltas.view(-1), expected_delta)


# ---------------------------------------------------------------------------------------------
# Other modalities (spec §9)
# ---------------------------------------------------------------------------------------------
def test_forward_use_cache_returns_the_cache(thinker):
    """The prefill cache comes back in ``past_key_values`` whatever transformers calls it (``cache`` from 5.24)."""
    inp = build_inputs(thinker.config, AV_ROWS, padding_side="right")
    w = wrap(thinker, 0.5, 0.5)
    with torch.no_grad():
        out = w(**inp, use_cache=True)
        no_cache = w(**inp, use_cache=False)
    assert no_cache.past_key_values is None
    assert out.past_key_values is not None
    assert out.past_key_values.get_seq_length() == out.attention_mask.shape[1] == max(w.last_stats["kept_length"])


@pytest.mark.parametrize(
    "name,rows",
    [
        ("video_only", [[T(3), V(4, 2, 2, audio_tokens=0), T(3)], [T(2), V(2, 2, 2, audio_tokens=0), T(4)]]),
        ("audio_only", [[T(3), A(30), T(3)], [T(2), A(12), T(4)]]),
        ("text_only", [[T(9)], [T(5)]]),
        ("image", [[T(3), I(2, 2), T(3)], [T(2), I(1, 3), T(4)]]),
        ("image_and_av", [[T(2), I(2, 2), T(2), V(2, 2, 2), T(3)], [T(3), V(3, 2, 2), T(2), I(1, 2), T(1)]]),
    ],
)
def test_modalities(thinker, name, rows):
    inp, labels = split_labels(build_inputs(thinker.config, rows, answer=3, padding_side="left"))
    w = wrap(thinker, 0.0, 0.0)
    with torch.no_grad():
        ref = thinker(**native_kwargs(inp), labels=labels, use_cache=False)
        out = w(**inp, labels=labels)
    torch.testing.assert_close(out.logits[out.attention_mask.bool()], ref.logits[inp["attention_mask"].bool()],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    ref_gen = thinker.generate(**native_kwargs(inp), max_new_tokens=3, do_sample=False)
    assert torch.equal(w.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen[:, inp["input_ids"].shape[1]:])
    # Compressed: forward, backward and generate all run.
    w.rho_video, w.rho_audio = 0.5, 0.5
    out = w(**inp, labels=labels)
    out.loss.backward()
    st = w.last_stats
    new = w.generate(**inp, max_new_tokens=3, do_sample=False)
    assert new.shape == (2, 3)
    if name == "video_only":
        assert st["video_kept"] == [8, 4] and st["audio_total"] == [0, 0]
    elif name == "audio_only":
        assert st["audio_kept"] == st["audio_total"] == [30, 12]  # no video anchors: unchanged
    elif name in ("text_only", "image"):
        assert st["kept_length"] == st["original_length"]
    else:
        assert st["video_kept"] == [4, 6] and st["audio_kept"] == [25, 38]


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["4.57.1", "4.51.3", "6.0.0", "3.0", "dev"])
def test_unsupported_transformers_version(thinker, monkeypatch, version):
    import sys

    # Building a model may re-register the lazy ``transformers`` module: patch the current one.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(RuntimeError, match=r"transformers >=5\.0,<6\.0"):
        OmniSIFTThinker(thinker)


@pytest.mark.parametrize("version", ["5.0.0", "5.17.0", "5.23.0", "5.30.0.dev0"])
def test_supported_transformers_version(version):
    assert check_transformers_version(version) == version
    import sys

    assert check_transformers_version() == sys.modules["transformers"].__version__


# ---------------------------------------------------------------------------------------------
# python/infer.py
# ---------------------------------------------------------------------------------------------
def test_infer_script_tiny_random(tmp_path, capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "infer.py")
    spec = importlib.util.spec_from_file_location("omnisift_infer_script", path)
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    saved = tmp_path / "inputs.pt"
    out = infer.main(["--tiny-random", "--rho-video", "0.5", "--rho-audio", "0.5", "--max-new-tokens", "3",
                      "--repeats", "1", "--save-inputs", str(saved)])
    text = capsys.readouterr().out
    assert "prefill without compression" in text and "prefill with compression" in text
    assert "row 1: video 6/12 kept, audio 38/75 kept" in text
    assert len(out["answers"]) == 2 and all(len(a) == 3 for a in out["answers"])
    again = infer.main(["--tiny-random", "--inputs", str(saved), "--preset", "paper-35", "--max-new-tokens", "2",
                        "--repeats", "0"])
    assert again["stats"]["audio_total"] == out["stats"]["audio_total"]
    assert again["stats"]["audio_kept"] != out["stats"]["audio_kept"]  # per-call ratios took effect
