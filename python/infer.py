#!/usr/bin/env python
"""Answer with Qwen2.5-Omni on an OmniSIFT-compressed prompt; print kept token counts and prefill times.

Media files:          python python/infer.py --model PATH --video clip.mp4 --prompt "What happens?"
                      (PATH holds the thinker or full-model weights and the processor files; media are
                      decoded with PyAV: pip install av; the processor's video path needs torchvision)
Preprocessed inputs:  python python/infer.py --model PATH --inputs sample.pt --preset paper-35
CPU smoke run:        python python/infer.py --tiny-random --rho-video 0.5 --rho-audio 0.5

``--video`` takes the clip's sound track interleaved with its frames (``use_audio_in_video``, the
layout OmniSIFT compresses: video pruning plus vision-guided audio selection). ``--no-audio-in-video``
uses the frames only; add ``--audio FILE`` (the same video file works) to give a sound track as its own
audio block, which is kept whole (OmniSIFT has no video anchors for it). ``--audio`` alone and
``--image`` are not compressed (see python/README.md).

``--inputs`` is a ``torch.save``d dict of the processor's outputs (``input_ids``, ``attention_mask``,
``input_features``, ``feature_attention_mask``, ``pixel_values_videos``, ``video_grid_thw``,
``video_second_per_grid``, ``pixel_values``, ``image_grid_thw``; batch >= 1, left padding for
batches). Without a tokenizer (``--tiny-random``) the answer is printed as token ids.
The prefill time is the encoders + merge + LLM forward over the prompt (one step of decoding), without
compression (the native thinker) and with it (plus the compression itself); median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

try:
    import omnisift_kernels  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from omnisift_kernels import VisionGuidedAudioSelector, get_preset  # noqa: E402
from omnisift_kernels import synthetic as syn  # noqa: E402
from omnisift_kernels.integrations import qwen2_5_omni as q  # noqa: E402
from omnisift_kernels.integrations import qwen2_5_omni_inputs as qi  # noqa: E402
from omnisift_kernels.testing.qwen2_5_omni import build_inputs  # noqa: E402

MODEL_DTYPE_INPUTS = ("pixel_values", "pixel_values_videos", "input_features")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Qwen2.5-Omni checkpoint (directory or hub id)")
    src.add_argument("--tiny-random", action="store_true", help="tiny random thinker and hand-built inputs")
    p.add_argument("--inputs", help="torch.save'd processor outputs (.pt)")
    p.add_argument("--video", help="video file (through the processor)")
    p.add_argument("--audio", help="audio file (through the processor)")
    p.add_argument("--image", help="image file (through the processor)")
    p.add_argument("--prompt", default="Describe what you see and hear.", help="user text with media files")
    p.add_argument("--no-audio-in-video", action="store_true",
                   help="do not interleave the video's sound track (frames only; add --audio FILE for a separate track)")
    p.add_argument("--system", default=qi.SYSTEM_PROMPT, help="system prompt ('' for none)")
    p.add_argument("--tiny-rows", type=int, default=2, help="--tiny-random: batch rows (different lengths)")
    p.add_argument("--save-inputs", help="write the inputs used as a .pt (e.g. the --tiny-random ones)")
    p.add_argument("--preset", help="ratio preset (paper-35, paper-25, release-default); --rho-* override it")
    p.add_argument("--rho-video", type=float, default=None, help="fraction of video tokens removed (default 0.7)")
    p.add_argument("--rho-audio", type=float, default=None, help="fraction of audio tokens removed (default 0.3)")
    p.add_argument("--compressor", help="selector weights (release checkpoint dir, .safetensors, or train.py .pt)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--attn-implementation", default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed prefills (after one warm-up); 0: no timing")
    args = p.parse_args(argv)
    if args.preset:
        pr = get_preset(args.preset)
        args.rho_video = pr.rho_video if args.rho_video is None else args.rho_video
        args.rho_audio = pr.rho_audio if args.rho_audio is None else args.rho_audio
    args.rho_video = 0.7 if args.rho_video is None else args.rho_video
    args.rho_audio = 0.3 if args.rho_audio is None else args.rho_audio
    if args.model and not (args.inputs or args.video or args.audio or args.image):
        p.error("--model needs --inputs or media files (--video/--audio/--image)")
    if args.tiny_random and (args.video or args.audio or args.image):
        p.error("--tiny-random has no processor: use --inputs or the built-in synthetic inputs")
    return args


def load(args, device):
    processor = None
    thinker, dtype = q.load_thinker(args.model, device=device, dtype=args.dtype, tiny_random=args.tiny_random,
                                    seed=args.seed, attn_implementation=args.attn_implementation)
    thinker.eval()
    if not args.tiny_random:
        try:
            from transformers import Qwen2_5OmniProcessor

            processor = Qwen2_5OmniProcessor.from_pretrained(args.model)
        except Exception as e:  # no processor/tokenizer files: ids only
            if args.video or args.audio or args.image:
                raise SystemExit(f"[infer] media files need the processor files next to the weights in "
                                 f"{args.model}: {type(e).__name__}: {e}") from e
            print(f"[infer] no processor for {args.model} ({type(e).__name__}); answers are printed as ids")
    d_model = thinker.config.get_text_config().hidden_size
    torch.manual_seed(args.seed)
    selector = VisionGuidedAudioSelector(d_model).to(device=device, dtype=dtype)
    wrapper = q.OmniSIFTThinker(thinker, selector, rho_video=args.rho_video, rho_audio=args.rho_audio).eval()
    source = args.compressor or args.model
    if source:
        try:
            q.load_compressor_from_checkpoint(wrapper, source)
            print(f"[infer] selector weights from {source}")
        except Exception as e:
            if args.compressor:
                raise
            print(f"[infer] no selector weights in {source} ({type(e).__name__}): random selector")
    elif not args.tiny_random:
        print("[infer] random selector (pass --compressor)")
    return wrapper, processor


def processor_inputs(args, processor) -> dict:
    """Decodes the media files (PyAV) and runs the checkpoint's processor on the chat."""
    videos, tracks, images, audios = [], [], [], []
    use_aiv = False
    if args.video:
        frames, track = qi.read_video(args.video, with_audio=not args.no_audio_in_video)
        videos.append(frames)
        tracks.append(track)
        use_aiv = track is not None
        if not args.no_audio_in_video and track is None:
            print(f"[infer] {args.video} has no sound track: video only")
    if args.image:
        images.append(qi.read_image(args.image))
    if args.audio:
        audios.append(qi.read_audio(args.audio))
    conversation = qi.conversation(args.prompt, video=args.video, image=args.image, audio=args.audio,
                                   system=args.system or None)
    text = qi.render_prompt(processor, conversation)
    return qi.processor_inputs(processor, text, videos=videos, video_audio=tracks if use_aiv else None,
                               images=images, audio=audios, use_audio_in_video=use_aiv)


def tiny_inputs(config, rows: int, seed: int) -> dict:
    items = [[syn.Text(4 + 3 * (r % 3)), syn.Video(2 + r % 3, 2, 2), syn.Text(3 + r % 2)] for r in range(rows)]
    return build_inputs(config, items, padding_side="left", seed=seed)


def timed(fn, repeats: int, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wrapper, processor = load(args, device)
    thinker = wrapper.thinker
    if args.inputs:
        inputs = dict(torch.load(args.inputs, map_location="cpu", weights_only=True))
        inputs.pop("labels", None)
    elif args.tiny_random:
        inputs = tiny_inputs(thinker.config, args.tiny_rows, args.seed)
    else:
        inputs = processor_inputs(args, processor)
    if args.save_inputs:
        torch.save(inputs, args.save_inputs)
    dtype = next(thinker.parameters()).dtype
    # Pixels and mel features in the model's dtype; video_second_per_grid stays fp32 (it scales TMRoPE time
    # ids, which bf16 would round for values like 2/3).
    inputs = {k: (v.to(device=device, dtype=dtype) if k in MODEL_DTYPE_INPUTS and torch.is_tensor(v)
                  and v.is_floating_point() else v.to(device) if torch.is_tensor(v) else v)
              for k, v in inputs.items()}
    if "use_audio_in_video" not in inputs:
        inputs["use_audio_in_video"] = wrapper._detect_audio_in_video(inputs["input_ids"])

    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    for k in ("temperature", "top_p", "top_k"):
        if getattr(args, k) is not None:
            gen[k] = getattr(args, k)
    torch.manual_seed(args.seed)
    new_tokens = wrapper.generate(**inputs, **gen)
    stats = dict(wrapper.last_stats)

    print(f"[infer] ratios: rho_video={args.rho_video} rho_audio={args.rho_audio}")
    for b in range(new_tokens.shape[0]):
        print(f"[infer] row {b}: video {stats['video_kept'][b]}/{stats['video_total'][b]} kept, "
              f"audio {stats['audio_kept'][b]}/{stats['audio_total'][b]} kept"
              f"{' (%d separate, kept whole)' % stats['audio_separate'][b] if stats['audio_separate'][b] else ''}, "
              f"sequence {stats['original_length'][b]} -> {stats['kept_length'][b]} tokens")
    print(f"[infer] audio+video retention: {stats['retention']:.3f}")
    answers = []
    for b in range(new_tokens.shape[0]):
        ids = new_tokens[b].tolist()
        if processor is not None:
            text = processor.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            answers.append(text)
            print(f"[infer] answer {b}: {text}")
        else:
            answers.append(ids)
            print(f"[infer] answer {b} (token ids): {ids}")

    timing = {}
    if args.repeats > 0:
        media = {k: v for k, v in inputs.items() if k != "use_audio_in_video"}

        @torch.no_grad()
        def native():
            thinker(**media, use_audio_in_video=inputs["use_audio_in_video"], use_cache=True)

        @torch.no_grad()
        def compressed():
            prompt = wrapper.prepare_generation(**inputs)
            thinker(**prompt, use_cache=True)

        timing["prefill_native_s"] = timed(native, args.repeats, device)
        timing["prefill_compressed_s"] = timed(compressed, args.repeats, device)
        print(f"[infer] prefill without compression: {1e3 * timing['prefill_native_s']:.1f} ms "
              f"({stats['original_length']} tokens)")
        print(f"[infer] prefill with compression:    {1e3 * timing['prefill_compressed_s']:.1f} ms "
              f"({stats['kept_length']} tokens, compression included)")
    return {"answers": answers, "stats": stats, "timing": timing}


if __name__ == "__main__":
    main()
