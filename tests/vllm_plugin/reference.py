"""What the plugin must reproduce: ``OmniSIFTThinker`` (transformers) on the same requests.

:class:`Reference` loads the checkpoint's thinker and selector once; :meth:`Reference.run` gives, for
one request, the kept token ids, the log-probabilities of the compressed prompt and those of the
decode steps after it (the decode positions continue from ``max(kept position) + 1``, spec §6).
"""

from __future__ import annotations

import torch

import assets


class Reference:
    def __init__(self, checkpoint: str) -> None:
        assets.A.prepare_torchvision()
        from transformers import Qwen2_5OmniProcessor

        from omnisift_kernels.integrations.qwen2_5_omni import load_thinker

        self.processor = Qwen2_5OmniProcessor.from_pretrained(checkpoint)
        self.thinker, _ = load_thinker(checkpoint, device=torch.device("cpu"), dtype="float32")
        self.thinker.eval()
        self.checkpoint = checkpoint
        self._wrappers = {}

    def wrapper(self, rho_video: float, rho_audio: float):
        from omnisift_kernels.integrations.qwen2_5_omni import OmniSIFTThinker, load_compressor_from_checkpoint

        key = (rho_video, rho_audio)
        if key not in self._wrappers:
            w = OmniSIFTThinker(self.thinker, rho_video=rho_video, rho_audio=rho_audio)
            load_compressor_from_checkpoint(w, self.checkpoint)
            self._wrappers[key] = w
        return self._wrappers[key]

    @torch.no_grad()
    def run(self, request: dict, rho_video: float, rho_audio: float, gen_ids: list[int]) -> dict:
        """``kept_ids``, ``prompt_logprobs [K, V]`` (row i: the next-token distribution after kept
        token i) and ``gen_logprobs [len(gen_ids), V]`` (step j: the distribution ``gen_ids[j]`` was
        drawn from)."""
        w = self.wrapper(rho_video, rho_audio)
        inputs = assets.hf_inputs(self.processor, request)
        media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        embeds, pos, mask = w.merge_modalities(inputs["input_ids"], inputs["attention_mask"], **media)
        res = w.compress(embeds, inputs["input_ids"], pos, mask, rho_video=rho_video, rho_audio=rho_audio,
                         output="right")
        kept = inputs["input_ids"][0][res.keep_mask[0]].tolist()
        n = len(gen_ids)
        # The prompt, then the generated tokens but the last (each step feeds the previous token).
        fed = torch.tensor([gen_ids[:-1]], dtype=torch.long) if n > 1 else torch.zeros(1, 0, dtype=torch.long)
        E = torch.cat([res.inputs_embeds, self.thinker.get_input_embeddings()(fed)], dim=1)
        P = res.position_ids
        step = (P.max() + 1 + torch.arange(fed.shape[1])).view(1, 1, -1).expand(3, 1, -1)
        P = torch.cat([P, step], dim=-1)
        out = self.thinker(inputs_embeds=E, position_ids=P, attention_mask=torch.ones(E.shape[:2], dtype=torch.long))
        lp = torch.log_softmax(out.logits[0].float(), dim=-1)
        K = res.inputs_embeds.shape[1]
        return {"kept_ids": kept, "prompt_logprobs": lp[:K], "gen_logprobs": lp[K - 1: K - 1 + n],
                "keep_mask": res.keep_mask[0]}
