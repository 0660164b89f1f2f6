"""FP8 block quantisation in the GLM-5-FP8 / DeepSeek-V3 format.

Weights are float8_e4m3fn with a float32 ``weight_scale_inv`` per 128×128 block
([ceil(out/128), ceil(in/128)]); despite its name the scale multiplies: W ≈ W_fp8 · scale_inv.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128


def dequantize_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out,in] fp8 weight × per-block scale -> dense ``dtype`` weight. Partial edge blocks are handled."""
    out_f, in_f = w.shape
    rb, cb = -(-out_f // block), -(-in_f // block)
    if tuple(scale_inv.shape) != (rb, cb):
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
                         f"with {block}x{block} blocks (expected {(rb, cb)})")
    s = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (w.float() * s).to(dtype)


def quantize_block(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [out,in] weight -> (fp8 weight, fp32 scale_inv [ceil(out/b), ceil(in/b)]), scale = block amax / 448."""
    out_f, in_f = w.shape
    rb, cb = -(-out_f // block), -(-in_f // block)
    wf = w.float()
    padded = wf.new_zeros(rb * block, cb * block)
    padded[:out_f, :in_f] = wf
    blocks = padded.view(rb, block, cb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [rb,cb]
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(rb * block, cb * block)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.float()


# Modules the official GLM-5-FP8 checkpoint keeps in bf16/fp32: norms, the router (and its bias), the
# indexer's weights_proj and k_norm, embeddings, lm_head and the MTP block's eh_proj/enorm/hnorm/shared_head.
_KEEP_PATTERNS = ("layernorm", ".norm.", "k_norm", ".gate.weight", "e_score_correction_bias", "weights_proj",
                  "embed_tokens", "lm_head", "eh_proj", "enorm", "hnorm", "shared_head")


def is_fp8_quantizable(file_key: str, shape: tuple | None = None) -> bool:
    """Whether a checkpoint tensor is stored as FP8 in the GLM-5-FP8 layout (2-D Linear weights only)."""
    if not file_key.endswith(".weight"):
        return False
    if shape is not None and len(shape) != 2:
        return False
    return not any(p in file_key for p in _KEEP_PATTERNS)
