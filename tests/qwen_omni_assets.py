"""Offline Qwen2.5-Omni assets for the tests: a real processor, a matching tiny thinker, an mp4.

Nothing here downloads anything. :func:`build_processor` assembles a ``Qwen2_5OmniProcessor`` from
transformers' own classes (a byte-level ``Qwen2Tokenizer`` with a tiny vocabulary and merges written
here plus the Omni special tokens, ``WhisperFeatureExtractor``, the Qwen2-VL image and video
processors and a chat template in the release's format); :func:`build_thinker_config` gives a tiny
random thinker whose special ids come from that tokenizer; :func:`write_clip` writes an mp4 of moving
squares with a 16 kHz sound track through PyAV.

The Qwen2-VL processors import torchvision. PyPI's torchvision wheels are CUDA builds whose import
fails beside a CPU-only torch; :func:`prepare_torchvision` defines the two schemas its Python side
expects (``tests/_shims/omnisift_torchvision_hook.py``; the tests put ``tests/_shims`` on ``PYTHONPATH``
for the programs they run, whose ``sitecustomize.py`` installs the same hook). That is a
test-environment measure, not part of the package.
"""

from __future__ import annotations

import os
import sys
from fractions import Fraction

import numpy as np
import torch

SHIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shims")

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
    "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
)
# The attribute names the Omni processor reads from its tokenizer.
MODEL_SPECIAL_TOKENS = {
    "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}
# The release's chat template, reduced to what these tests use (system/user/assistant turns whose
# content is a string or a list of text/image/video/audio items).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' or 'image' in item %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif item['type'] == 'audio' or 'audio' in item %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A few BPE merges so the tokenizer merges something (byte-level symbols: 'Ġ' is the space).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "u")]


def prepare_torchvision() -> None:
    """Makes ``import torchvision`` work in this process (see the module docstring)."""
    if SHIMS not in sys.path:
        sys.path.append(SHIMS)
    import omnisift_torchvision_hook as hook  # the venv's copy when make setup installed one

    hook.install()
    if "torchvision" not in sys.modules:
        hook.define_torchvision_schemas()


def subprocess_env() -> dict[str, str]:
    """The environment for programs run by the tests: the torchvision shim on ``PYTHONPATH``."""
    env = dict(os.environ)
    root = os.path.dirname(SHIMS.rstrip(os.sep))
    parts = [SHIMS, os.path.dirname(root)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def _byte_symbols() -> list[str]:
    """The 256 printable symbols of byte-level BPE, in byte order (GPT-2's mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def build_tokenizer():
    """A byte-level ``Qwen2Tokenizer`` with 256 byte tokens, a few merges and the Omni special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=list(MERGES), unk_token="<|endoftext|>",
        eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=dict(MODEL_SPECIAL_TOKENS),
    )
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    tok.add_tokens(missing, special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(min_pixels: int = 28 * 28 * 4, max_pixels: int = 112 * 112, chunk_length: int = 10):
    """A ``Qwen2_5OmniProcessor`` made of transformers' own classes (no hub files).

    Args:
        min_pixels, max_pixels: the image and video processors' pixel range per frame.
        chunk_length: the feature extractor's padding length in seconds (the release uses 30).
    """
    prepare_torchvision()
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        WhisperFeatureExtractor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image = Qwen2VLImageProcessor(size=dict(size), patch_size=14, temporal_patch_size=2, merge_size=2)
    video = Qwen2VLVideoProcessor(size=dict(size), patch_size=14, temporal_patch_size=2, merge_size=2)
    audio = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                    chunk_length=chunk_length, n_fft=400, return_attention_mask=True)
    return Qwen2_5OmniProcessor(image_processor=image, video_processor=video, feature_extractor=audio,
                                tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)


def build_thinker_config(tokenizer, hidden_size: int = 32, num_layers: int = 2):
    """A tiny random ``Qwen2_5OmniThinkerConfig`` whose special ids are the tokenizer's."""
    from omnisift_kernels.testing.qwen2_5_omni import tiny_thinker_config

    ids = {
        "audio_token_index": "<|AUDIO|>", "image_token_index": "<|IMAGE|>", "video_token_index": "<|VIDEO|>",
        "audio_start_token_id": "<|audio_bos|>", "audio_end_token_id": "<|audio_eos|>",
        "vision_start_token_id": "<|vision_bos|>", "vision_end_token_id": "<|vision_eos|>",
    }
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in ids.items()}
    vocab = -(-len(tokenizer) // 16) * 16
    return tiny_thinker_config(hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab,
                               pad_token_id=tokenizer.pad_token_id, token_ids=ids)


def build_checkpoint(directory: str, seed: int = 0, full_model: bool = False) -> str:
    """Writes processor files and a tiny random thinker (or full model) checkpoint to ``directory``."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    proc = build_processor()
    cfg = build_thinker_config(proc.tokenizer)
    torch.manual_seed(seed)
    if full_model:
        from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

        model = Qwen2_5OmniForConditionalGeneration(
            Qwen2_5OmniConfig(thinker_config=cfg.to_dict(), enable_audio_output=False))
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    model.generation_config.eos_token_id = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


def write_clip(path: str, seconds: float = 4.0, size: tuple[int, int] = (112, 112), fps: int = 8,
               sample_rate: int = 16000, audio: bool = True, seed: int = 0) -> str:
    """Writes an mp4 of moving squares (H.264 or MPEG-4 Part 2) with a tone track (AAC, mono).

    Args:
        path: the file to write.
        seconds: duration.
        size: ``(height, width)`` of the frames.
        fps: frame rate of the file.
        sample_rate: sampling rate of the sound track.
        audio: False writes a silent (video-only) file.
        seed: positions and colours of the squares.
    """
    import av

    rng = np.random.default_rng(seed)
    h, w = size
    n_frames = int(round(seconds * fps))
    squares = [(rng.integers(0, 256, 3), rng.integers(8, max(9, min(h, w) // 3)), rng.random(2) * 2 - 1)
               for _ in range(3)]
    with av.open(path, mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        vs = container.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        a_stream = None
        if audio:
            a_stream = container.add_stream("aac", rate=sample_rate)
            a_stream.layout = "mono"
        for i in range(n_frames):
            img = np.full((h, w, 3), 30, dtype=np.uint8)
            for k, (colour, side, vel) in enumerate(squares):
                y = int((h - side) * (0.5 + 0.5 * np.sin(i * vel[0] * 0.3 + k)))
                x = int((w - side) * (0.5 + 0.5 * np.cos(i * vel[1] * 0.3 + 2 * k)))
                img[y:y + side, x:x + side] = colour
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        if a_stream is not None:
            t = np.arange(int(seconds * sample_rate)) / sample_rate
            tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * np.floor(t)) * t) + 0.05 * rng.standard_normal(t.size)
            tone = tone.astype(np.float32)
            step = 1024
            for start in range(0, tone.size, step):
                chunk = tone[None, start:start + step]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                for packet in a_stream.encode(frame):
                    container.mux(packet)
            for packet in a_stream.encode():
                container.mux(packet)
    return path


def write_image(path: str, size: tuple[int, int] = (56, 84), seed: int = 0) -> str:
    """Writes a PNG of random blocks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[0] // 14, size[1] // 14, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((14, 14, 1), dtype=np.uint8))).save(path)
    return path


def write_wav(path: str, seconds: float = 2.0, sample_rate: int = 16000, seed: int = 0) -> str:
    """Writes a 16-bit mono WAV of a tone with a little noise (through PyAV)."""
    import av

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)) * 32767
    pcm = x.astype(np.int16)[None]
    with av.open(path, mode="w") as container:
        s = container.add_stream("pcm_s16le", rate=sample_rate)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in s.encode(frame):
            container.mux(packet)
        for packet in s.encode():
            container.mux(packet)
    return path
