"""Offline assets of the vLLM plugin tests: a tiny checkpoint with selector weights, media, requests.

The checkpoint is a ``Qwen2_5OmniForConditionalGeneration`` (thinker only) saved with transformers:
head dimension 32 (vLLM's CPU attention has no kernel for smaller heads), untied text head (the HF
thinker does not tie it; vLLM would), and the selector at ``thinker.compressor.*`` as the authors'
release saves it. The processor is ``tests/qwen_omni_assets.build_processor``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (qwen_omni_assets)

import qwen_omni_assets as A  # noqa: E402

PROMPT_HEAD = "<|im_start|>user\n"
PROMPT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
VIDEO = "<|vision_bos|><|VIDEO|><|vision_eos|>"
IMAGE = "<|vision_bos|><|IMAGE|><|vision_eos|>"
AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def build_checkpoint(directory: str, seed: int = 0, hidden_size: int = 128, with_selector: bool = True,
                     num_layers: int = 2, max_pixels: int = 112 * 112) -> str:
    """Writes the tiny checkpoint and processor to ``directory`` (see the module docstring).

    Args:
        directory: where to write.
        seed: the weights' seed.
        hidden_size: the text width (4 heads: 128 gives vLLM's smallest CPU head size, 32).
        with_selector: save the selector at ``thinker.compressor.*`` (stock vLLM refuses those keys).
        num_layers: text decoder layers.
        max_pixels: the processor's largest frame (pixels).
    """
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    from omnisift_kernels import VisionGuidedAudioSelector

    proc = A.build_processor(max_pixels=max_pixels)
    cfg = A.build_thinker_config(proc.tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    cfg.text_config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(thinker_config=cfg.to_dict(), enable_audio_output=False))
    if with_selector:
        model.thinker.compressor = VisionGuidedAudioSelector(hidden_size)
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    model.generation_config.eos_token_id = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


def video(seed: int, frames: int = 8, size: tuple[int, int] = (56, 84)) -> np.ndarray:
    """``[frames, H, W, 3]`` uint8 frames: moving blocks (so video pruning has structure to find)."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.integers(0, 256, (h // 14, w // 14, 3), dtype=np.uint8)
    out = []
    for f in range(frames):
        img = np.kron(np.roll(base, f // 2, axis=1), np.ones((14, 14, 1), dtype=np.uint8))
        noise = rng.integers(0, 24, img.shape, dtype=np.uint8)
        out.append(img + noise)
    return np.stack(out)


def audio(seed: int, seconds: float = 4.0) -> np.ndarray:
    """Mono 16 kHz float32 audio: a tone plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (220 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def image(seed: int, size: tuple[int, int] = (56, 84)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[0] // 14, size[1] // 14, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((14, 14, 1), dtype=np.uint8))


def request(kind: str, seed: int = 0, text: str = "what happens here?", frames: int = 8,
            audio_seed: int | None = None, size: tuple[int, int] = (56, 84), fps: float | None = None) -> dict:
    """One request as ``{"prompt", "videos", "audios", "images", "use_audio_in_video", "fps"}``.

    Kinds: ``"video+audio"`` (a video with its sound track), ``"video"``, ``"two-videos"`` (``frames``
    then 4 frames), ``"image"``, ``"audio"`` (standalone), ``"text"``. ``seed`` draws the media
    (``audio_seed``, when given, the sound track); ``fps`` is the processors' frame rate (None: their
    default, 2, one temporal grid per second); the track lasts ``frames / 2`` seconds whatever it is.
    """
    r = {"videos": [], "audios": [], "images": [], "use_audio_in_video": False, "fps": fps}
    if kind == "video+audio":
        r["videos"] = [video(seed, frames, tuple(size))]
        r["audios"] = [audio(seed if audio_seed is None else audio_seed, seconds=frames / 2)]
        r["use_audio_in_video"] = True
        media = VIDEO
    elif kind == "video":
        r["videos"] = [video(seed, frames, tuple(size))]
        media = VIDEO
    elif kind == "two-videos":
        r["videos"] = [video(seed, frames), video(seed + 100, 4)]
        media = VIDEO + "and" + VIDEO
    elif kind == "image":
        r["images"] = [image(seed)]
        media = IMAGE
    elif kind == "audio":
        r["audios"] = [audio(seed, seconds=2.0)]
        media = AUDIO
    elif kind == "text":
        media = ""
    else:
        raise ValueError(f"unknown request kind {kind!r}")
    r["prompt"] = PROMPT_HEAD + media + text + PROMPT_TAIL
    return r


def vllm_prompt(r: dict) -> dict:
    """The request as a vLLM prompt dict."""
    mm = {}
    if r["videos"]:
        mm["video"] = list(r["videos"])
    if r["audios"]:
        mm["audio"] = [(a, 16000) for a in r["audios"]]
    if r["images"]:
        mm["image"] = list(r["images"])
    out = {"prompt": r["prompt"]}
    if mm:
        out["multi_modal_data"] = mm
    kwargs = {}
    if r["use_audio_in_video"]:
        kwargs["use_audio_in_video"] = True
    if r.get("fps") is not None:
        kwargs["fps"] = r["fps"]
    if kwargs:
        out["mm_processor_kwargs"] = kwargs
    return out


def hf_inputs(processor, r: dict) -> dict:
    """The request through the transformers processor (``OmniSIFTThinker``'s inputs)."""
    from omnisift_kernels.integrations.qwen2_5_omni_inputs import processor_inputs

    extra = {"fps": r["fps"]} if r.get("fps") is not None else {}
    if r["use_audio_in_video"]:
        return processor_inputs(processor, r["prompt"], videos=r["videos"], video_audio=r["audios"],
                                images=r["images"] or None, use_audio_in_video=True, **extra)
    return processor_inputs(processor, r["prompt"], videos=r["videos"] or None, images=r["images"] or None,
                            audio=r["audios"] or None, use_audio_in_video=False, **extra)
