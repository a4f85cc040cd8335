"""The vision-guided audio selector (spec §4): the only trainable part of OmniSIFT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.chunk_attention import heads_attention


class VisionGuidedAudioSelector(nn.Module):
    """Scores audio tokens by cross-attending to the chunk's surviving video tokens.

    ``v = LN_v(W_v video)``, ``a = LN_a(W_a audio)``, ``h = MHA(query=a, key=v, value=v)``,
    ``x = LN_post(h + a)``, ``s = sigmoid(Linear(H/2 -> 1)(SiLU(Linear(H -> H/2)(x))))``.

    Parameter names and shapes are those of the authors' release (``thinker.compressor.*``), so a
    released state dict loads with ``load_state_dict(strict=True)``. At ``d_model=3584`` (Qwen2.5-Omni
    7B) the module has 4,856,321 parameters.

    Args:
        d_model: width D of the LLM embeddings.
        num_heads: attention heads of ``cross_attn`` (must divide ``hidden_dim``).
        hidden_dim: width H of the projected space.
    """

    def __init__(self, d_model: int, num_heads: int = 8, hidden_dim: int = 512) -> None:
        super().__init__()
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(d_model) or d_model <= 0:
            raise ValueError(f"VisionGuidedAudioSelector: d_model must be a positive int, got {d_model!r}")
        if not is_int(hidden_dim) or hidden_dim < 2:
            raise ValueError(f"VisionGuidedAudioSelector: hidden_dim must be an int >= 2, got {hidden_dim!r}")
        if not is_int(num_heads) or num_heads <= 0 or hidden_dim % num_heads:
            raise ValueError(
                f"VisionGuidedAudioSelector: num_heads must be a positive divisor of hidden_dim={hidden_dim}, "
                f"got {num_heads!r}"
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.v_proj = nn.Linear(d_model, hidden_dim)
        self.a_proj = nn.Linear(d_model, hidden_dim)
        self.v_norm = nn.LayerNorm(hidden_dim)
        self.a_norm = nn.LayerNorm(hidden_dim)
        self.cross_attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.post_attn_norm = nn.LayerNorm(hidden_dim)
        self.score_head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.SiLU(), nn.Linear(hidden_dim // 2, 1)
        )

    @property
    def param_dtype(self) -> torch.dtype:
        return self.v_proj.weight.dtype

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, hidden_dim={self.hidden_dim}"

    # ------------------------------------------------------------------------------------------
    def _check_width(self, name: str, t: torch.Tensor) -> None:
        if t.shape[-1] != self.d_model:
            raise ValueError(
                f"VisionGuidedAudioSelector: {name} must have last dimension d_model={self.d_model}, "
                f"got shape {tuple(t.shape)}"
            )

    def head_scores(self, attended: torch.Tensor, audio_hidden: torch.Tensor, linear=F.linear) -> torch.Tensor:
        """fp32 scores ``[..., La]`` from the cross attention's output: the residual, ``post_attn_norm``
        and ``score_head`` (``linear`` computes its two layers, as in :meth:`attend`)."""
        x = self.post_attn_norm(attended + audio_hidden)
        hidden, out = self.score_head[0], self.score_head[2]  # Linear, SiLU, Linear
        x = linear(F.silu(linear(x, hidden.weight, hidden.bias)), out.weight, out.bias)
        return torch.sigmoid(x).squeeze(-1).float()

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """Scores one chunk: ``audio [La, D]`` against ``video [Lv, D]``.

        Args:
            audio: ``[La, D]`` audio embeddings of the chunk (any float dtype; cast to the
                parameters' dtype).
            video: ``[Lv, D]`` surviving video embeddings of the chunk, ``Lv >= 1``.

        Returns:
            fp32 ``[La]`` scores in (0, 1).
        """
        if audio.dim() != 2 or video.dim() != 2:
            raise ValueError(
                "VisionGuidedAudioSelector: audio and video must be 2-D [tokens, D] for one chunk, got "
                f"{tuple(audio.shape)} and {tuple(video.shape)} (use score_chunks for a batch)"
            )
        self._check_width("audio", audio)
        self._check_width("video", video)
        if video.shape[0] == 0:
            raise ValueError("VisionGuidedAudioSelector: video must hold at least one token, got 0")
        dtype = self.param_dtype
        v = self.v_norm(self.v_proj(video.to(dtype)))[None]
        a = self.a_norm(self.a_proj(audio.to(dtype)))[None]
        h, _ = self.cross_attn(a, v, v, need_weights=False)
        return self.head_scores(h, a)[0]

    def score_chunks(
        self,
        audio: torch.Tensor,
        video: torch.Tensor,
        video_padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Scores a batch of chunks at once; equal (within fp tolerance) to scoring each alone.

        Args:
            audio: ``[C, La, D]`` audio of C chunks, right-padded (padded queries are scored too;
                ignore their outputs).
            video: ``[C, Lv, D]`` surviving video of the chunks, right-padded.
            video_padding_mask: bool ``[C, Lv]``, True at padded video positions. Every chunk must
                hold at least one real video token.

        Returns:
            fp32 ``[C, La]`` scores.
        """
        if audio.dim() != 3 or video.dim() != 3:
            raise ValueError(
                "VisionGuidedAudioSelector.score_chunks: audio and video must be 3-D [chunks, tokens, D], "
                f"got {tuple(audio.shape)} and {tuple(video.shape)}"
            )
        self._check_width("audio", audio)
        self._check_width("video", video)
        if video_padding_mask.shape != video.shape[:2] or video_padding_mask.dtype != torch.bool:
            raise ValueError(
                "VisionGuidedAudioSelector.score_chunks: video_padding_mask must be bool "
                f"{tuple(video.shape[:2])}, got {video_padding_mask.dtype} {tuple(video_padding_mask.shape)}"
            )
        dtype = self.param_dtype
        v = self.v_norm(self.v_proj(video.to(dtype)))
        a = self.a_norm(self.a_proj(audio.to(dtype)))
        return self.head_scores(self.attend(a, v, video_padding_mask), a)

    def attend(self, a: torch.Tensor, v: torch.Tensor, video_padding_mask: torch.Tensor | None,
               linear=F.linear, attention=None) -> torch.Tensor:
        """The cross attention of projected, normalised ``a [C, La, H]`` to ``v [C, Lv, H]``.

        Computed from ``cross_attn``'s packed weights, identical in math to ``nn.MultiheadAttention``
        with a key padding mask (``video_padding_mask`` bool ``[C, Lv]``, True at padding; None: no
        padding). ``linear``: computes the four projections (``F.linear``, or the fast path's
        :func:`omnisift_kernels.cpu_gemm.linear`); ``attention``: the attention of the projected
        heads, ``attention(q, k, v, key_padding, num_heads) -> [C, La, H]`` (default
        :func:`omnisift_kernels.ops.chunk_attention.heads_attention`, ``scaled_dot_product_attention``; the CPU fast path passes
        :func:`omnisift_kernels.ops.chunk_attention.chunk_attention`).
        """
        H = self.hidden_dim
        w, b = self.cross_attn.in_proj_weight, self.cross_attn.in_proj_bias
        q = linear(a, w[:H], b[:H])
        kv = linear(v, w[H:], b[H:])  # keys and values in one GEMM (rows H:3H of the packed weight)
        o = (attention or heads_attention)(q, kv[..., :H], kv[..., H:], video_padding_mask, self.num_heads)
        return linear(o, self.cross_attn.out_proj.weight, self.cross_attn.out_proj.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
