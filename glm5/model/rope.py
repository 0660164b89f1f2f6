"""Rotary position embedding as GLM-5 uses it: plain RoPE (no YaRN) on the rope dims, interleaved pairs.

Pairs (2j, 2j+1) rotate by angle pos·θ^(-2j/d). The rotated result is returned de-interleaved
([even outputs | odd outputs]), the layout transformers 5.23 produces; since q and k receive the same
permutation, q·k equals the complex-multiply (DeepSeek) form exactly. The split-half (NeoX) variant is
kept for configs that set ``rope_interleave: false``.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [B, S, rope_dim/2] for the given positions.

    No buffers: ``inv_freq`` is recomputed per device on demand, so a model built on the meta device
    and materialised with ``to_empty`` needs no re-initialisation.
    """

    def __init__(self, rope_dim: int, theta: float):
        super().__init__()
        self.rope_dim = rope_dim
        self.theta = float(theta)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exps = torch.arange(0, self.rope_dim, 2, dtype=torch.int64, device=device).float() / self.rope_dim
            self._inv_freq[device] = 1.0 / (self.theta ** exps)
        return self._inv_freq[device]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, S] -> angles [B, S, rope_dim/2], computed in fp32 then cast to the activation
        # dtype (the reference's rounding: bf16 cos/sin under bf16 models).
        angles = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate the last dim of ``x`` ([..., d]); cos/sin are [..., d/2] and must broadcast against x[..., :d/2].

    Callers unsqueeze the head dim of cos/sin to match x's layout.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
