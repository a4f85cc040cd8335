"""Media files to Qwen2.5-Omni processor outputs, on every supported transformers version.

:func:`read_video` decodes a video file with PyAV (``pip install av``; no ffmpeg binary needed):
frames sampled at 2 fps as the release's ``qwen-omni-utils`` does (an even count, at least 4) and,
when the file has one, its sound track resampled to 16 kHz mono. :func:`read_audio` and
:func:`read_image` read the other media. :func:`conversation` builds the chat,
:func:`render_prompt` templates it and :func:`processor_inputs` runs ``Qwen2_5OmniProcessor`` on it.

The processor's way of taking a video's own sound track changed inside transformers 5.x:

- 5.0 to 5.22: ``processor(..., audio=[track], use_audio_in_video=True)``; the audio list is consumed
  in text order (a video's track at its ``<|VIDEO|>``, standalone audio at ``<|AUDIO|>``);
- from 5.23 (``OmniModalProcessorMixin``): the same call also needs
  ``audio_from_video_indices`` (which video each audio entry belongs to, None for standalone audio),
  else it counts the track against the ``<|AUDIO|>`` placeholders and fails; the flag is renamed
  ``load_audio_from_video`` (``use_audio_in_video`` is deprecated).

:func:`processor_inputs` detects which API the installed processor has and calls it accordingly.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Sequence

import numpy as np

SAMPLE_RATE = 16000
VIDEO_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768
SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)

__all__ = [
    "SYSTEM_PROMPT",
    "conversation",
    "processor_inputs",
    "read_audio",
    "read_image",
    "read_video",
    "render_prompt",
]


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading media files needs PyAV: pip install av") from e
    return av


def _check_file(where: str, path: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such file {str(path)!r}")


def _decode_audio(container, stream, sample_rate: int) -> np.ndarray:
    """All of ``stream`` resampled to mono float32 at ``sample_rate``."""
    av = _av()
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    parts = []
    for frame in container.decode(stream):
        frame.pts = None
        for out in resampler.resample(frame):
            parts.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        parts.append(out.to_ndarray().reshape(-1))
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def read_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first sound track of a file (audio or video) as mono float32 samples at ``sample_rate``.

    Raises:
        ValueError: the file does not exist or has no sound track.
    """
    _check_file("read_audio", path)
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"read_audio: {str(path)!r} has no sound track")
        return _decode_audio(container, container.streams.audio[0], sample_rate)


def read_image(path: str):
    """An image file as an RGB ``PIL.Image``."""
    _check_file("read_image", path)
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def sample_frame_indices(total: int, duration_s: float, fps: float = VIDEO_FPS) -> np.ndarray:
    """Indices of the frames kept at ``fps`` (``qwen-omni-utils``' rule: an even count in [4, 768],
    spread evenly over the clip; frames are repeated when the file has fewer)."""
    if total <= 0:
        raise ValueError(f"sample_frame_indices: the video has no frames (total={total})")
    n = duration_s * fps if duration_s > 0 else total
    n = min(max(n, MIN_FRAMES), MAX_FRAMES)
    n = max(MIN_FRAMES, int(n // 2) * 2)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def read_video(path: str, fps: float = VIDEO_FPS, with_audio: bool = True,
               sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes a video file: frames sampled at ``fps`` and (optionally) its sound track.

    Args:
        path: the video file (mp4, mkv, webm, ... whatever PyAV reads).
        fps: frames kept per second (the processor's ``video_second_per_grid`` assumes 2).
        with_audio: also decode the first sound track.
        sample_rate: sampling rate of the returned track.

    Returns:
        ``(frames, audio)``: uint8 ``[T, H, W, 3]`` with an even ``T >= 4``, and mono float32 samples
        (None when ``with_audio`` is False or the file is silent).
    """
    _check_file("read_video", path)
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"read_video: {str(path)!r} has no video stream")
        vs = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(vs)]
        if not frames:
            raise ValueError(f"read_video: {str(path)!r} has no decodable frames")
        duration = float(vs.duration * vs.time_base) if vs.duration and vs.time_base else 0.0
        if duration <= 0 and vs.average_rate:
            duration = len(frames) / float(vs.average_rate)
        audio = None
        if with_audio and container.streams.audio:
            container.seek(0)
            audio = _decode_audio(container, container.streams.audio[0], sample_rate)
    idx = sample_frame_indices(len(frames), duration, fps)
    return np.stack([frames[i] for i in idx]), audio


def conversation(prompt: str, *, video: Any = None, image: Any = None, audio: Any = None,
                 system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """A one-turn chat in the release's format: the media items (video, image, audio), then the text."""
    content = []
    for kind, value in (("video", video), ("image", image), ("audio", audio)):
        if value is not None:
            content.append({"type": kind, kind: value})
    content.append({"type": "text", "text": prompt})
    conv = []
    if system:
        conv.append({"role": "system", "content": [{"type": "text", "text": system}]})
    conv.append({"role": "user", "content": content})
    return conv


_PLACEHOLDERS = {
    "video": "<|vision_bos|><|VIDEO|><|vision_eos|>",
    "image": "<|vision_bos|><|IMAGE|><|vision_eos|>",
    "audio": "<|audio_bos|><|AUDIO|><|audio_eos|>",
}


def render_prompt(processor, conv: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat as text: the processor's chat template, or the release's format when it has none.

    The release's format: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, media items as
    ``<|vision_bos|><|VIDEO|><|vision_eos|>``, ``<|vision_bos|><|IMAGE|><|vision_eos|>`` and
    ``<|audio_bos|><|AUDIO|><|audio_eos|>``, then ``<|im_start|>assistant\n``.
    """
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False)
    parts = []
    for msg in conv:
        content = msg["content"]
        if not isinstance(content, str):
            content = "".join(item["text"] if item["type"] == "text" else _PLACEHOLDERS[item["type"]]
                              for item in content)
        parts.append(f"<|im_start|>{msg['role']}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _call_parameters(processor) -> set[str]:
    names = set()
    for cls in type(processor).__mro__:
        fn = cls.__dict__.get("__call__")
        if fn is not None:
            names |= set(inspect.signature(fn).parameters)
    return names


def _kwarg_names(processor) -> set[str]:
    """Keyword names the processor's kwargs TypedDict declares at the top level."""
    names = set()
    kw = getattr(processor, "valid_processor_kwargs", None)
    for cls in getattr(kw, "__mro__", ()):
        names |= set(getattr(cls, "__annotations__", {}))
    return names


def processor_inputs(
    processor,
    text: str | Sequence[str],
    *,
    videos: Sequence[np.ndarray] | None = None,
    video_audio: Sequence[np.ndarray | None] | None = None,
    images: Sequence[Any] | None = None,
    audio: Sequence[np.ndarray] | None = None,
    use_audio_in_video: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Runs ``Qwen2_5OmniProcessor`` with the call its transformers version expects.

    Args:
        processor: a ``Qwen2_5OmniProcessor``.
        text: the templated prompt(s) (``apply_chat_template(..., tokenize=False)``).
        videos: decoded videos (``[T, H, W, 3]`` uint8 each), in text order.
        video_audio: per video its sound track (or None for a silent one); used with
            ``use_audio_in_video``.
        images: images in text order.
        audio: standalone audio clips in text order (their own ``<|AUDIO|>`` placeholders).
        use_audio_in_video: interleave each video's track with its frames (the release's layout).
            Only one prompt per call when it mixes videos with sound and standalone audio.
        **kwargs: passed to the processor (``padding``, ...).

    Returns:
        The processor's outputs as a dict of tensors plus ``use_audio_in_video`` (True when some video
        carries its sound track).
    """
    videos = list(videos) if videos else []
    audio = list(audio) if audio else []
    tracks = list(video_audio) if video_audio is not None else [None] * len(videos)
    if len(tracks) != len(videos):
        raise ValueError(f"processor_inputs: video_audio must have one entry per video ({len(videos)}), "
                         f"got {len(tracks)}")
    aiv = bool(use_audio_in_video and videos and any(t is not None for t in tracks))
    if aiv and any(t is None for t in tracks):
        raise ValueError("processor_inputs: with use_audio_in_video every video needs its sound track "
                         "(the processor pairs tracks with videos); got a silent one")
    call: dict[str, Any] = dict(text=text, return_tensors="pt", padding=True)
    call.update(kwargs)
    if images:
        call["images"] = list(images)
    if videos:
        call["videos"] = videos
    if aiv:
        params = _call_parameters(processor)
        if "audio_from_video_indices" in params:
            # 5.23+: one audio slot per video track and per standalone clip. The tracks come first in
            # the slot list; standalone clips keep their text order among themselves.
            call["audio"] = tracks + audio
            call["audio_from_video_indices"] = list(range(len(videos))) + [None] * len(audio)
            key = "load_audio_from_video" if "load_audio_from_video" in _kwarg_names(processor) else "use_audio_in_video"
            call[key] = True
        else:
            # 5.0-5.22: the audio list is consumed in text order; this helper puts media in the order
            # video, image, audio (see conversation()), so the tracks come first.
            call["audio"] = tracks + audio
            call["use_audio_in_video"] = True
    elif audio:
        call["audio"] = audio
    out = dict(processor(**call))
    out["use_audio_in_video"] = aiv
    return out
