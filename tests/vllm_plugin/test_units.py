"""The plugin's parts without an engine: settings, exact position channels, placeholder counts,
transformers' positions of a compressed prompt, the version check."""

from __future__ import annotations

import random

import pytest
import torch

from omnisift_kernels.integrations.vllm import check_vllm_version
from omnisift_kernels.integrations.vllm.config import ServingConfig, serving_config
from omnisift_kernels.integrations.vllm.positions import (
    _RopeIndex, compressed_positions, decode_positions, encode_positions, item_relative_positions,
)
from omnisift_kernels.integrations.vllm.processor import audio_tokens_from_mel, compressed_video_ids, track_span_ids
from omnisift_kernels.layout import Video
from omnisift_kernels.plan import sizes_from_grid


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.fixture(scope="module")
def thinker_config():
    import assets

    tok = assets.A.build_tokenizer()
    cfg = assets.A.build_thinker_config(tok, hidden_size=128)
    return cfg


def test_serving_config():
    assert serving_config(_Cfg()) == ServingConfig(False, 0.0, 0.0)
    assert serving_config(_Cfg(omnisift={})) == ServingConfig(True, 0.7, 0.3)
    c = serving_config(_Cfg(omnisift={"preset": "paper-35", "rho_video": 0.1}))
    assert (c.rho_video, c.rho_audio, c.preset) == (0.67, 0.4, "paper-35")
    assert not serving_config(_Cfg(omnisift={"enabled": False})).enabled
    c = serving_config(_Cfg(rho_video=0.5, rho_audio=0.2))
    assert (c.enabled, c.rho_video, c.rho_audio) == (True, 0.5, 0.2)
    assert serving_config(_Cfg(omnisift_preset="paper-25")).rho_video == 0.77
    assert serving_config(_Cfg(thinker_config=_Cfg(omnisift={"rho_audio": 0.0}))).rho_audio == 0.0
    with pytest.raises(ValueError, match=r"hf_overrides\['rho_video'\] must be in"):
        serving_config(_Cfg(rho_video=-0.1))
    for section, exc, text in [
        ([0.5], TypeError, "must be a dict"),
        ({"rho": 0.5}, ValueError, "unknown keys"),
        ({"rho_video": 1.0}, ValueError, r"\['rho_video'\] must be in \[0, 1\)"),
        ({"rho_audio": float("nan")}, ValueError, "rho_audio"),
        ({"rho_audio": "0.3"}, TypeError, "rho_audio"),
        ({"enabled": 1}, TypeError, "enabled"),
        ({"preset": "nope"}, ValueError, "nope"),
    ]:
        with pytest.raises(exc, match=text):
            serving_config(_Cfg(omnisift=section))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_position_channels_are_exact(dtype):
    g = torch.Generator().manual_seed(0)
    rel = torch.cat([torch.randint(0, 256 ** 3, (3, 500), generator=g),
                     torch.tensor([[0, 255, 256, 1500, 65535, 65536, 256 ** 3 - 1]] * 3)], dim=1)
    assert torch.equal(decode_positions(encode_positions(rel, dtype)), rel)


def test_register_refuses_other_vllm_versions(monkeypatch):
    import vllm

    from omnisift_kernels.integrations import vllm as plugin

    assert plugin.register() is True
    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    with pytest.warns(RuntimeWarning, match="vLLM 0.40.0 is not supported"):
        assert plugin.register() is False


def test_version_check():
    assert check_vllm_version("0.32.0") == "0.32.0"
    assert check_vllm_version("0.32.1rc1") == "0.32.1rc1"
    for v in ("0.31.2", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match="not supported"):
            check_vllm_version(v)


def test_placeholder_counts_follow_the_plan(thinker_config):
    """The processor's span length is the kept length sizes_from_grid gives (minus bos/eos tokens)."""
    rng = random.Random(0)
    for _ in range(200):
        t, h, w = rng.randint(1, 9), 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)
        spg = rng.choice([1.0, 1.0, 0.5, 2.0, 1.5])
        audio = rng.choice([None, 0, rng.randint(1, 300)])
        rv, ra = rng.choice([0.0, 0.3, 0.67, 0.77]), rng.choice([0.0, 0.3, 0.5])
        cfg = ServingConfig(True, rv, ra)
        ids = compressed_video_ids(thinker_config, cfg, [t, h, w], spg, audio)
        item = Video(t, h // 2, w // 2, audio_tokens=audio or 0, second_per_grid=spg)
        _, kept = sizes_from_grid([[item]], rho_video=rv, rho_audio=ra, score_audio=True)
        extra = 4 if audio else 2
        inner = kept[0] - extra
        if audio is None:
            assert len(ids) == inner
        else:
            assert len(ids) == inner + 2
            assert ids[0] == thinker_config.audio_start_token_id and ids[-1] == thinker_config.audio_end_token_id
        n_video = sum(1 for i in ids if i == thinker_config.video_token_index)
        per_frame = (h // 2) * (w // 2)
        assert n_video == t * (per_frame - int(per_frame * rv))


SPAN_CASES = [  # (grid_thw, second_per_grid, audio tokens): fps 2, 4, 8, 1, 0.5, 0.4; audio shorter or longer
    ([8, 4, 6], 1.0, 200), ([8, 4, 6], 1.0, 137), ([5, 4, 4], 1.0, 260), ([8, 4, 4], 0.5, 100),
    ([7, 4, 4], 0.5, 175), ([9, 2, 4], 0.25, 60), ([6, 4, 4], 2.0, 300), ([5, 4, 4], 2.0, 211),
    ([4, 2, 2], 4.0, 400), ([5, 2, 4], 5.0, 610), ([3, 4, 4], 4.0, 90), ([1, 4, 4], 1.0, 30),
]


@pytest.mark.parametrize("grid,spg,n_audio", SPAN_CASES)
def test_track_span_is_the_transformers_processors(thinker_config, grid, spg, n_audio):
    """The uncompressed span of a video with its sound track is the one Qwen2_5OmniProcessor writes
    (vLLM 0.32's own differs below 1 fps)."""
    import assets

    assets.A.prepare_torchvision()
    processor = assets.A.build_processor()
    text = processor.replace_multimodal_special_tokens(
        [processor.vision_bos_token + processor.video_token + processor.vision_eos_token],
        iter([n_audio]), iter([]), iter([torch.tensor(grid)]), iter([spg]), True, 25, 2)[0]
    expected = processor.tokenizer(text, add_special_tokens=False)["input_ids"][1:-1]
    assert track_span_ids(thinker_config, grid, spg, n_audio) == expected


@pytest.mark.parametrize("grid,spg,n_audio", SPAN_CASES)
@pytest.mark.parametrize("rho_video,rho_audio", [(0.7, 0.3), (0.5, 0.77), (0.0, 0.5), (0.3, 0.0)])
def test_compressed_span_is_the_kept_ids(thinker_config, grid, spg, n_audio, rho_video, rho_audio):
    """The compressed placeholders are the ids the compressor keeps of the uncompressed span, exactly
    when each chunk's audio is one run (up to 1 second per grid); above, the same tokens in number."""
    from omnisift_kernels import OmniSIFTCompressor

    cfg = thinker_config
    span = track_span_ids(cfg, grid, spg, n_audio)
    ids = [cfg.vision_start_token_id] + span + [cfg.vision_end_token_id]
    rope = _RopeIndex(cfg)
    mel = next(m for m in range(4 * n_audio + 8) if audio_tokens_from_mel(m) == n_audio)
    pos = rope(ids, image_grid_thw=[], video_grid_thw=[grid], audio_seqlens=[mel], second_per_grids=[spg],
               use_audio_in_video=True)
    g = torch.Generator().manual_seed(len(ids))
    d = 32
    embeds = torch.randn(1, len(ids), d, generator=g)
    compressor = OmniSIFTCompressor(d, rho_video=rho_video, rho_audio=rho_audio, backend="reference")
    with torch.no_grad():
        res = compressor(embeds, torch.tensor([ids]), pos.unsqueeze(1), torch.ones(1, len(ids), dtype=torch.long),
                         video_token_id=cfg.video_token_index, audio_token_id=cfg.audio_token_index, output="right")
    kept = torch.tensor(ids)[res.keep_mask[0]].tolist()[1:-1]
    ours = compressed_video_ids(cfg, ServingConfig(True, rho_video, rho_audio), grid, spg, n_audio)
    if spg <= 1.0:
        assert ours == kept
    else:
        assert sorted(ours) == sorted(kept) and ours[0] == kept[0] and ours[-1] == kept[-1]


def test_audio_tokens_from_mel():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    for n in (1, 3, 99, 100, 101, 400, 1000, 3001):
        _, out = Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, torch.tensor(n))
        assert audio_tokens_from_mel(n) == int(out)


@pytest.mark.parametrize("with_audio", [True, False])
def test_compressed_positions_are_transformers_positions(thinker_config, with_audio):
    """Base + relative position of any kept subset equals transformers' ids of the full prompt there."""
    cfg = thinker_config
    rope = _RopeIndex(cfg)
    grid, spg, mel = [3, 4, 6], 1.0, 400
    n_audio = audio_tokens_from_mel(mel)
    if with_audio:
        span = track_span_ids(cfg, grid, spg, n_audio)
        inner = span[1:-1]
    else:
        inner = [cfg.video_token_index] * (3 * 4 * 6 // 4)
        span = inner
    text = [5, 6, 7]
    image = [cfg.image_token_index] * 6
    full = text + [cfg.vision_start_token_id] + image + [cfg.vision_end_token_id] + [8] + \
        [cfg.vision_start_token_id] + span + [cfg.vision_end_token_id] + [9, 10]
    truth = rope(full, image_grid_thw=[[1, 4, 6]], video_grid_thw=[grid], audio_seqlens=[mel] if with_audio else [],
                 second_per_grids=[spg], use_audio_in_video=with_audio)
    span_at = len(text) + 1 + len(image) + 1 + 1 + 1
    lead = 1 if with_audio else 0
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(len(inner), generator=g) < 0.4
    kept_inner = [i for i, k in zip(inner, keep.tolist()) if k]
    comp_span = ([span[0]] if with_audio else []) + kept_inner + ([span[-1]] if with_audio else [])
    prompt = full[:span_at] + comp_span + full[span_at + len(span):]
    embed = torch.tensor([False] * lead + [True] * len(kept_inner) + [False] * lead)
    spans = [
        dict(modality="image", offset=len(text) + 1, length=len(image), original=image, embed=None, grid_thw=[1, 4, 6]),
        dict(modality="video", offset=span_at, length=len(comp_span), original=span, embed=embed, grid_thw=grid,
             second_per_grid=spg, audio_seqlen=mel if with_audio else None),
    ]
    pos, delta = compressed_positions(rope, prompt, spans)
    rel = item_relative_positions(rope, inner, grid_thw=grid, second_per_grid=spg,
                                  audio_seqlen=mel if with_audio else None)
    emb_at = torch.arange(span_at + lead, span_at + lead + len(kept_inner))
    pos[:, emb_at] += rel[:, keep]
    kept_full = torch.ones(len(full), dtype=torch.bool)
    kept_full[span_at + lead: span_at + lead + len(inner)] = keep
    assert torch.equal(pos, truth[:, kept_full])
    assert delta == int(truth.max()) + 1 - len(prompt)


def test_checkpoint_with_selector_is_served_compressed(tmp_path):
    """No settings: a local checkpoint with thinker.compressor.* weights gets the release's ratios."""
    from safetensors.torch import save_file

    from omnisift_kernels.integrations.vllm.config import checkpoint_has_selector

    plain, omni = tmp_path / "plain", tmp_path / "omni"
    plain.mkdir()
    omni.mkdir()
    save_file({"thinker.model.x": torch.zeros(2)}, str(plain / "model.safetensors"))
    save_file({"thinker.model.x": torch.zeros(2)}, str(omni / "model-00001.safetensors"))
    save_file({"thinker.compressor.v_proj.weight": torch.zeros(2)}, str(omni / "model-00002.safetensors"))
    assert not checkpoint_has_selector(str(plain)) and checkpoint_has_selector(str(omni))
    assert serving_config(_Cfg(), str(omni)) == ServingConfig(True, 0.7, 0.3)
    assert not serving_config(_Cfg(), str(plain)).enabled
    assert not serving_config(_Cfg(), "Qwen/Qwen2.5-Omni-7B").enabled
    assert not serving_config(_Cfg(omnisift={"enabled": False}), str(omni)).enabled
