#!/usr/bin/env python
"""Train the OmniSIFT audio selector (and optionally the LLM) of Qwen2.5-Omni on the compressed sequence.

Single process:   python python/train.py --model PATH --data train.jsonl --save-dir ckpt
Several (DDP):    torchrun --nproc-per-node 2 python/train.py ...   (gloo on the CPU, nccl on CUDA)
CPU smoke run:    python python/train.py --tiny-random --steps 4 --save-dir /tmp/ckpt

JSONL schema (one training sample per line; paths are relative to the JSONL file). A sample is
either media files run through the checkpoint's processor, or preprocessed processor outputs:

    {"video": "clips/0001.mp4", "prompt": "What happens?", "answer": "Two squares move."}
    {"video": "clips/0002.mp4", "use_audio_in_video": false, "answer": "A red square."}
    {"audio": "clips/0003.wav", "image": "img/0003.png", "answer": "A tone."}
    {"inputs": "samples/0004.pt", "answer_ids": [9707, 11, 1879]}
    {"inputs": "samples/0005.pt"}                      # labels inside the .pt

- ``video`` / ``audio`` / ``image`` (media samples): files decoded with PyAV (``pip install av``) and
  Pillow; the chat is the system prompt (``system``, default the release's), the media (video, image,
  audio) and ``prompt`` (default "Describe what you see and hear."), templated with the processor's
  chat template and a generation prompt. ``use_audio_in_video`` (default true) interleaves the video's
  sound track with its frames, the layout OmniSIFT compresses. Needs ``--model`` with processor files.
- ``inputs``: a ``torch.save``d dict of the Qwen2.5-Omni processor's outputs for ONE
  conversation (batch dimension 1): ``input_ids``, ``attention_mask`` and whichever media tensors it
  has (``input_features``, ``feature_attention_mask``, ``pixel_values_videos``, ``video_grid_thw``,
  ``video_second_per_grid``, ``pixel_values``, ``image_grid_thw``); optionally ``labels [1, L]``
  (-100 = not supervised) and ``use_audio_in_video``.
- ``answer_ids`` (optional): token ids appended to the prompt and supervised.
- ``answer`` (optional): text, tokenized with the model's tokenizer (``--model`` must hold tokenizer
  files), appended and supervised (an end-of-turn id is appended when the tokenizer knows
  ``<|im_end|>``). A sample needs ``answer``, ``answer_ids`` or labels in its ``.pt``.

A batch must agree on ``use_audio_in_video`` (transformers' ``get_rope_index`` takes one flag per
batch). Checkpoints (``--save-dir``, every ``--save-every`` steps and at the end) are
``checkpoint-<step>.pt`` = {selector state dict, optimizer, step, args[, llm]} plus
``compressor.safetensors`` in the release's layout (``thinker.compressor.*``); ``--resume auto``
continues from the newest one (the data order is a function of the seed and the step, so a resumed
run continues exactly where it stopped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

try:
    import omnisift_kernels  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from omnisift_kernels import VisionGuidedAudioSelector, get_preset  # noqa: E402
from omnisift_kernels import synthetic as syn  # noqa: E402
from omnisift_kernels.integrations import qwen2_5_omni as q  # noqa: E402
from omnisift_kernels.integrations import qwen2_5_omni_inputs as qi  # noqa: E402
from omnisift_kernels.testing.qwen2_5_omni import build_inputs  # noqa: E402

MEDIA_FIELDS = ("video", "audio", "image")
DEFAULT_PROMPT = "Describe what you see and hear."


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class JsonlDataset:
    """Samples of the JSONL schema above; ``__getitem__`` returns a processor-output dict with labels."""

    def __init__(self, path: str, tokenizer=None, processor=None) -> None:
        self.root = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            self.rows = [json.loads(line) for line in f if line.strip()]
        if not self.rows:
            raise ValueError(f"{path}: no samples")
        for i, r in enumerate(self.rows):
            has_media = any(r.get(k) for k in MEDIA_FIELDS)
            if "inputs" not in r and not has_media:
                raise ValueError(f"{path}: line {i + 1} has neither an 'inputs' path nor media "
                                 f"({', '.join(MEDIA_FIELDS)})")
            if has_media and processor is None:
                raise ValueError(f"{path}: line {i + 1} has media files, which need the checkpoint's processor "
                                 "(--model with processor files)")
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)

    def _path(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def _process_media(self, row: dict) -> dict:
        """One media sample through the processor (batch 1)."""
        paths = {k: self._path(row[k]) for k in MEDIA_FIELDS if row.get(k)}
        want_aiv = bool(row.get("use_audio_in_video", True))
        videos, tracks, images, audios = [], [], [], []
        aiv = False
        if "video" in paths:
            frames, track = qi.read_video(paths["video"], with_audio=want_aiv)
            videos.append(frames)
            tracks.append(track)
            aiv = track is not None
        if "image" in paths:
            images.append(qi.read_image(paths["image"]))
        if "audio" in paths:
            audios.append(qi.read_audio(paths["audio"]))
        conv = qi.conversation(row.get("prompt", DEFAULT_PROMPT), video=paths.get("video"),
                               image=paths.get("image"), audio=paths.get("audio"),
                               system=row.get("system", qi.SYSTEM_PROMPT))
        text = qi.render_prompt(self.processor, conv)
        return qi.processor_inputs(self.processor, text, videos=videos, video_audio=tracks if aiv else None,
                                   images=images, audio=audios, use_audio_in_video=aiv)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        if "inputs" in row:
            path = self._path(row["inputs"])
            s = dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            path = f"sample {i}"
            s = self._process_media(row)
        ids = s["input_ids"] if s["input_ids"].dim() == 2 else s["input_ids"][None]
        if ids.shape[0] != 1:
            raise ValueError(f"{path}: expected one conversation (batch 1), got input_ids {tuple(ids.shape)}")
        mask = s.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.reshape(1, -1)
        answer = row.get("answer_ids")
        if answer is None and row.get("answer") is not None:
            if self.tokenizer is None:
                raise ValueError(f"sample {i}: 'answer' text needs a tokenizer (--model with tokenizer files)")
            answer = self.tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
            end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end, int) and end >= 0 and end != getattr(self.tokenizer, "unk_token_id", None):
                answer = answer + [end]
        labels = s.get("labels")
        labels = torch.full_like(ids, -100) if labels is None else labels.reshape(1, -1)
        if answer:
            a = torch.tensor(answer, dtype=ids.dtype)[None]
            ids = torch.cat([ids, a], 1)
            mask = torch.cat([mask, torch.ones_like(a)], 1)
            labels = torch.cat([labels, a], 1)
        if not bool((labels != -100).any()):
            raise ValueError(f"sample {i}: nothing supervised (no labels, answer_ids or answer)")
        s.update(input_ids=ids, attention_mask=mask, labels=labels)
        return s


def synthetic_samples(config, n: int, seed: int) -> list[dict]:
    """Tiny-random samples: text, a 2-4 s video with its audio track, text, and a 4-token answer."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        secs, before, after = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((2, 5), (2, 8), (1, 5)))
        row = [syn.Text(before), syn.Video(secs, 2, 2), syn.Text(after)]
        out.append(build_inputs(config, [row], answer=4, seed=seed * 1000 + i))
    return out


def write_synthetic(config, directory: str, n: int, seed: int) -> str:
    """Writes ``n`` synthetic samples as ``.pt`` files plus ``train.jsonl`` (the schema above)."""
    os.makedirs(os.path.join(directory, "samples"), exist_ok=True)
    path = os.path.join(directory, "train.jsonl")
    with open(path, "w") as f:
        for i, s in enumerate(synthetic_samples(config, n, seed)):
            sup = s["labels"][0] != -100
            prompt = {k: v for k, v in s.items() if k != "labels"}
            prompt["input_ids"] = s["input_ids"][:, ~sup]
            prompt["attention_mask"] = s["attention_mask"][:, ~sup]
            rel = os.path.join("samples", f"{i:04d}.pt")
            torch.save(prompt, os.path.join(directory, rel))
            f.write(json.dumps({"inputs": rel, "answer_ids": s["input_ids"][0, sup].tolist()}) + "\n")
    return path


def sample_indices(step: int, rank: int, world: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of rank ``rank``'s batch at ``step``: a fresh permutation per epoch, from the seed."""
    out = []
    for j in range(batch_size):
        flat = (step * world + rank) * batch_size + j
        epoch, pos = divmod(flat, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Qwen2.5-Omni checkpoint (directory or hub id)")
    src.add_argument("--tiny-random", action="store_true", help="tiny random thinker + synthetic data (CPU smoke run)")
    p.add_argument("--data", help="JSONL of samples (schema in the module docstring)")
    p.add_argument("--synthetic-samples", type=int, default=16, help="--tiny-random without --data: sample count")
    p.add_argument("--write-synthetic", metavar="DIR", help="--tiny-random: write synthetic JSONL + .pt samples and exit")
    p.add_argument("--preset", help="ratio preset (paper-35, paper-25, release-default)")
    p.add_argument("--rho-video", type=float, default=None, help="fraction of video tokens removed (default 0.7)")
    p.add_argument("--rho-audio", type=float, default=None, help="fraction of audio tokens removed (default 0.3)")
    p.add_argument("--compressor", help="initial selector weights (release checkpoint dir, .safetensors or .pt)")
    p.add_argument("--train-llm", action="store_true", help="also train the language model and lm_head")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: off)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per process per step")
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps")
    p.add_argument("--layout", choices=("right", "packed"), default="right", help="right padding or packed varlen")
    p.add_argument("--save-dir", help="checkpoint directory")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--resume", help="checkpoint file, or 'auto' (newest in --save-dir)")
    p.add_argument("--save-rank-params", action="store_true",
                   help="at the end every rank writes its trainable parameters to --save-dir/rank<r>_params.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model weights (auto: bf16 on CUDA, fp32 on CPU); the selector trains in fp32")
    p.add_argument("--attn-implementation", default=None, help="e.g. sdpa, flash_attention_2")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda (one GPU per process, nccl) when available, else cpu (gloo)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines instead)")
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    if args.preset:
        pr = get_preset(args.preset)
        args.rho_video = pr.rho_video if args.rho_video is None else args.rho_video
        args.rho_audio = pr.rho_audio if args.rho_audio is None else args.rho_audio
    args.rho_video = 0.7 if args.rho_video is None else args.rho_video
    args.rho_audio = 0.3 if args.rho_audio is None else args.rho_audio
    if args.model and not args.data:
        p.error("--model needs --data")
    if args.write_synthetic and not args.tiny_random:
        p.error("--write-synthetic needs --tiny-random")
    if args.resume and args.resume == "auto" and not args.save_dir:
        p.error("--resume auto needs --save-dir")
    return args


def init_distributed(device_arg: str | None = None):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg == "cuda"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s); "
                               "use --nproc-per-node <= GPUs, or --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def load_model(args, device):
    tokenizer = processor = None
    thinker, dtype = q.load_thinker(args.model, device=device, dtype=args.dtype, tiny_random=args.tiny_random,
                                    seed=args.seed, attn_implementation=args.attn_implementation)
    if not args.tiny_random:
        try:
            from transformers import Qwen2_5OmniProcessor

            processor = Qwen2_5OmniProcessor.from_pretrained(args.model)
            tokenizer = processor.tokenizer
        except Exception:  # no processor files: media samples are then refused
            processor = None
        if tokenizer is None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(args.model)
            except Exception:  # no tokenizer files: 'answer' text is then refused
                tokenizer = None
    d_model = thinker.config.get_text_config().hidden_size
    torch.manual_seed(args.seed)  # the same selector init on every rank
    selector = VisionGuidedAudioSelector(d_model).to(device)  # fp32 master weights
    wrapper = q.OmniSIFTThinker(thinker, selector, rho_video=args.rho_video, rho_audio=args.rho_audio)
    if args.compressor:
        q.load_compressor_from_checkpoint(wrapper, args.compressor)
    elif args.model:
        try:  # the authors' release stores thinker.compressor.* next to the model weights
            q.load_compressor_from_checkpoint(wrapper, args.model)
            print(f"[train] selector weights loaded from {args.model}")
        except Exception:
            pass
    for p in thinker.parameters():
        p.requires_grad_(False)
    trainable = list(wrapper.selector.parameters())
    if args.train_llm:
        llm = list(wrapper.language_model.parameters()) + list(thinker.lm_head.parameters())
        seen = {id(p) for p in trainable}
        trainable += [p for p in llm if id(p) not in seen]
    for p in trainable:
        p.requires_grad_(True)
    return wrapper, trainable, tokenizer, processor


def find_latest(save_dir: str) -> str | None:
    if not save_dir or not os.path.isdir(save_dir):
        return None
    steps = [int(f[len("checkpoint-"):-3]) for f in os.listdir(save_dir)
             if f.startswith("checkpoint-") and f.endswith(".pt") and f[len("checkpoint-"):-3].isdigit()]
    return os.path.join(save_dir, f"checkpoint-{max(steps)}.pt") if steps else None


def save_checkpoint(args, wrapper, opt, step: int) -> str:
    os.makedirs(args.save_dir, exist_ok=True)
    ckpt = {"step": step, "compressor": wrapper.selector.state_dict(), "optimizer": opt.state_dict(),
            "args": vars(args)}
    if args.train_llm:
        llm = {id(p) for p in list(wrapper.language_model.parameters()) + list(wrapper.thinker.lm_head.parameters())}
        ckpt["llm"] = {n: p.detach() for n, p in wrapper.thinker.named_parameters() if id(p) in llm}
    path = os.path.join(args.save_dir, f"checkpoint-{step}.pt")
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    try:
        from safetensors.torch import save_file

        save_file({f"thinker.compressor.{k}": v.detach().contiguous().cpu()
                   for k, v in wrapper.selector.state_dict().items()},
                  os.path.join(args.save_dir, "compressor.safetensors"))
    except ImportError:
        pass
    return path


def load_checkpoint(path: str, wrapper, opt) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    wrapper.selector.load_state_dict(ckpt["compressor"])
    if "llm" in ckpt:
        wrapper.thinker.load_state_dict(ckpt["llm"], strict=False)
    opt.load_state_dict(ckpt["optimizer"])
    return int(ckpt["step"])


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    wrapper, trainable, tokenizer, processor = load_model(args, device)
    cfg = wrapper.thinker.config
    if args.write_synthetic:
        if rank == 0:
            print(write_synthetic(cfg, args.write_synthetic, args.synthetic_samples, args.seed))
        return {}
    if args.data:
        data = JsonlDataset(args.data, tokenizer, processor)
    else:
        data = synthetic_samples(cfg, args.synthetic_samples, args.seed)
    pad_id = cfg.get_text_config().pad_token_id
    pad_id = 0 if pad_id is None else pad_id

    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    resume = find_latest(args.save_dir) if args.resume == "auto" else args.resume
    if resume:
        step = load_checkpoint(resume, wrapper, opt)
        if rank == 0:
            print(f"[train] resumed from {resume} at step {step}")

    wrapper.train()
    model = wrapper
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        keep = {id(p) for p in trainable}
        ignore = [n for n, p in wrapper.named_parameters() if id(p) not in keep]
        ignore += [n for n, _ in wrapper.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(wrapper, ignore)
        model = DDP(wrapper, device_ids=[device.index] if device.type == "cuda" else None)

    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=step, desc="omnisift", dynamic_ncols=True)
    selector_params = list(wrapper.selector.parameters())
    history = []
    t0 = time.time()
    while step < args.steps:
        idx = sample_indices(step, rank, world, args.batch_size, len(data), args.seed)
        batch = to_device(q.collate_inputs([data[i] for i in idx], pad_id, "right"), device)
        out = model(**batch, layout=args.layout)
        # A batch without a scored chunk (no video or no audio) leaves the selector unused: the zero term
        # keeps every rank's gradient reduction complete.
        loss = out.loss + 0.0 * sum(p.sum() for p in selector_params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        opt.step()
        step += 1

        stats = wrapper.last_stats
        kept = torch.tensor([out.loss.detach().float().item(), stats["retention"]], dtype=torch.float64)
        if world > 1:
            kept = kept.to(device)
            dist.all_reduce(kept)
            kept = kept.cpu() / world
        loss_v, ratio = float(kept[0]), float(kept[1])
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"non-finite loss {loss_v} at step {step}")
        history.append(loss_v)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_v:.4f}", kept=f"{ratio:.3f}")
            bar.update(1)
        elif rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"[train] step {step}/{args.steps} loss {loss_v:.4f} kept {ratio:.3f} "
                  f"({time.time() - t0:.1f}s)", flush=True)
        if args.save_dir and (step % args.save_every == 0 or step == args.steps):
            if rank == 0:
                save_checkpoint(args, wrapper, opt, step)
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    if args.save_rank_params and args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        names = {id(p): n for n, p in wrapper.named_parameters()}
        torch.save({names[id(p)]: p.detach().cpu() for p in trainable},
                   os.path.join(args.save_dir, f"rank{rank}_params.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"[train] done: {step} steps, last loss {history[-1] if history else float('nan'):.4f}", flush=True)
    return {"step": step, "losses": history}


if __name__ == "__main__":
    main()
