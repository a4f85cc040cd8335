"""Benchmark inputs: a workload at a dtype, a preset and a selector, built once per seed.

Shared by the CLI (``python -m bench``) and the pytest-benchmark file so both time the same thing.
"""

from __future__ import annotations

import dataclasses

import torch

from omnisift_kernels.presets import PRESETS, RatioPreset
from omnisift_kernels.selector import VisionGuidedAudioSelector
from omnisift_kernels.synthetic import WORKLOADS, SyntheticBatch, make_batch, make_workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_PRESETS = ("paper-35", "paper-25")
SELECTOR_SEED = 1234

# The acceptance check of the project: the retention these presets must give on omni7b-20s.
EXPECTED_RETENTION = {("omni7b-20s", "paper-35"): "35.19%", ("omni7b-20s", "paper-25"): "25.15%"}


def default_dtypes(device: torch.device) -> list[str]:
    """bf16 on the GPU (the models' dtype); fp32 and bf16 on the CPU."""
    return ["bf16"] if device.type == "cuda" else ["fp32", "bf16"]


def make_selector(d_model: int, *, dtype: torch.dtype = torch.float32, device="cpu",
                  seed: int = SELECTOR_SEED) -> VisionGuidedAudioSelector:
    """A randomly initialised selector (D -> 512, 8 heads), reproducible from ``seed``, in eval mode."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        sel = VisionGuidedAudioSelector(d_model)
    finally:
        torch.random.set_rng_state(gen_state)
    return sel.to(device=device, dtype=dtype).eval().requires_grad_(False)


@dataclasses.dataclass
class Case:
    """One input set: a batch, ratios and the selector. ``kwargs()`` feeds ``compress``."""

    workload: str
    dtype: str
    preset: RatioPreset
    seed: int
    batch: SyntheticBatch
    selector: VisionGuidedAudioSelector

    @property
    def device(self) -> torch.device:
        return self.batch.inputs_embeds.device

    def kwargs(self) -> dict:
        return dict(self.batch.compress_kwargs(), rho_video=self.preset.rho_video,
                    rho_audio=self.preset.rho_audio, selector=self.selector)


class CaseFactory:
    """Builds batches once per (workload, seed) in fp32 on the CPU and converts per dtype/device.

    Building a 20-second 7B workload takes about half a second (Python loops), so a run reuses them.
    """

    def __init__(self) -> None:
        self._fp32: dict[tuple, SyntheticBatch] = {}
        self._cache: dict[tuple, SyntheticBatch] = {}
        self._selectors: dict[tuple, VisionGuidedAudioSelector] = {}

    def batch(self, workload: str, dtype: str, device: torch.device, seed: int) -> SyntheticBatch:
        key = (workload, dtype, str(device), seed)
        if key not in self._cache:
            base_key = (workload, seed)
            if base_key not in self._fp32:
                self._fp32[base_key] = make_workload(workload, dtype=torch.float32, device="cpu", seed=seed)
            base = self._fp32[base_key]
            self._cache[key] = dataclasses.replace(
                base,
                inputs_embeds=base.inputs_embeds.to(device=device, dtype=DTYPES[dtype]),
                input_ids=base.input_ids.to(device),
                position_ids=base.position_ids.to(device),
                attention_mask=base.attention_mask.to(device),
                labels=base.labels.to(device),
            )
        return self._cache[key]

    def selector(self, d_model: int, selector_dtype: torch.dtype, device: torch.device) -> VisionGuidedAudioSelector:
        key = (d_model, selector_dtype, str(device))
        if key not in self._selectors:
            self._selectors[key] = make_selector(d_model, dtype=selector_dtype, device=device)
        return self._selectors[key]

    def cases(self, workload: str, dtype: str, preset: str, device: torch.device, seeds: list[int],
              selector_dtype: str = "fp32") -> list[Case]:
        d_model = WORKLOADS[workload].d_model
        sdt = DTYPES[dtype] if selector_dtype == "same" else DTYPES[selector_dtype]
        sel = self.selector(d_model, sdt, device)
        return [Case(workload, dtype, PRESETS[preset], s, self.batch(workload, dtype, device, s), sel) for s in seeds]

    def drop(self, workload: str) -> None:
        """Frees a workload's batches (long runs with several workloads)."""
        for d in (self._fp32, self._cache):
            for k in [k for k in d if k[0] == workload]:
                del d[k]


def clip_batch(seconds: int, frame_h: int, frame_w: int, d_model: int, *, dtype: torch.dtype,
               device, seed: int = 0) -> SyntheticBatch:
    """One row of ``seconds`` of video+audio (the scaling section's inputs)."""
    from omnisift_kernels.synthetic import clip_row

    return make_batch([clip_row(seconds, frame_h, frame_w)], d_model, dtype=dtype, device=device, seed=seed)


def counts(batch: SyntheticBatch) -> dict[str, int]:
    """Token counts of a batch: valid tokens, video, audio."""
    valid = batch.attention_mask.bool()
    return {
        "valid": int(valid.sum()),
        "video": int(((batch.input_ids == batch.video_token_id) & valid).sum()),
        "audio": int(((batch.input_ids == batch.audio_token_id) & valid).sum()),
        "d_model": batch.inputs_embeds.shape[-1],
    }
