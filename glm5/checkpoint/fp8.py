"""FP8 block quantisation in the GLM-5-FP8 / DeepSeek-V3 format.

Weights are float8_e4m3fn with a float32 ``weight_scale_inv`` per 128×128 block
([ceil(out/128), ceil(in/128)]); despite its name the scale multiplies: W ≈ W_fp8 · scale_inv.
Scale = block amax / 448 (the e4m3 max); partial edge blocks take the amax of their real elements.

Activations ("activation_scheme: dynamic") are quantised at run time per token and per 128-channel
group: x ≈ x_fp8 · s[token, k // 128] with s = group amax / 448. A block-scaled GEMM then computes
Σ_kb (x_fp8 · W_fp8ᵀ)[kb] · s_x[:, kb] · s_W[:, kb] in fp32, which in exact arithmetic equals
dequantise-both-then-matmul; :func:`fp8_block_matmul_reference` is that definition, used as the oracle.

This module also owns the "which tensors are FP8" rule and the ``quantization_config`` written into
``config.json`` (see :func:`quantization_config`).
"""

from __future__ import annotations

import re

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128
_EPS = 1e-12  # amax floor: an all-zero block gets a tiny scale and quantises to exact zeros


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(shape, block: int = BLOCK) -> tuple[int, ...]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape`` ([..., out, in] -> [..., ⌈out/b⌉, ⌈in/b⌉])."""
    *lead, out_f, in_f = shape
    return (*lead, ceil_div(out_f, block), ceil_div(in_f, block))


def _blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """[..., out, in] -> zero-padded [..., rb, block, cb, block] fp32 view/copy."""
    *lead, out_f, in_f = w.shape
    rb, cb = ceil_div(out_f, block), ceil_div(in_f, block)
    wf = w.float()
    if out_f % block or in_f % block:
        padded = wf.new_zeros(*lead, rb * block, cb * block)
        padded[..., :out_f, :in_f] = wf
        wf = padded
    return wf.reshape(*lead, rb, block, cb, block)


def quantize_block(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [..., out, in] weight -> (fp8 weight, fp32 scale_inv [..., ⌈out/b⌉, ⌈in/b⌉]).

    scale = block amax / 448, fp8 = round_to_nearest_even(w / scale) (saturating). Leading dims (e.g. a
    stack of experts) are independent matrices. Zero padding of partial edge blocks never changes an amax.
    """
    if w.dim() < 2:
        raise ValueError(f"quantize_block needs a [..., out, in] matrix, got shape {tuple(w.shape)}")
    *lead, out_f, in_f = w.shape
    blocks = _blocked(w, block)  # [..., rb, b, cb, b]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., rb, cb]
    scale = amax.clamp_min(_EPS) / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, blocks.shape[-4] * block, blocks.shape[-2] * block)[..., :out_f, :in_f]
    return q.to(FP8_DTYPE).contiguous(), scale.float().contiguous()


def dequantize_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., out, in] fp8 weight × per-block scale -> dense ``dtype`` weight. Partial edge blocks are handled.

    The product is formed in fp32 (exact: an e4m3 value times an fp32 scale needs at most 4+24 bits of
    mantissa, so it only rounds once, on the final cast to ``dtype``)."""
    *lead, out_f, in_f = w.shape
    expected = scale_shape(w.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
                         f"with {block}x{block} blocks (expected {expected})")
    s = scale_inv.float()
    if out_f % block == 0 and in_f % block == 0:
        rb, cb = expected[-2], expected[-1]
        out = w.float().reshape(*lead, rb, block, cb, block) * s[..., :, None, :, None]
        return out.reshape(w.shape).to(dtype)
    s = s.repeat_interleave(block, -2)[..., :out_f, :].repeat_interleave(block, -1)[..., :in_f]
    return (w.float() * s).to(dtype)


# ------------------------------------------------------------------------------------- activations
def quantize_act(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-``block``-channel-group quantisation (DeepSeek ``act_quant``).

    x [..., K] -> (fp8 [..., K], fp32 scale [..., ⌈K/block⌉]) with x ≈ fp8 · scale[..., k // block].
    A partial last group (K % block != 0) gets the amax of its real channels."""
    K = x.shape[-1]
    g = ceil_div(K, block)
    xf = x.float()
    if K % block:
        xf = torch.nn.functional.pad(xf, (0, g * block - K))
    xf = xf.reshape(*x.shape[:-1], g, block)
    scale = xf.abs().amax(-1).clamp_min(_EPS) / FP8_MAX  # [..., g]
    q = (xf / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).reshape(*x.shape[:-1], g * block)[..., :K]
    return q.to(FP8_DTYPE).contiguous(), scale


def dequantize_act(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    K = q.shape[-1]
    s = scale.float().repeat_interleave(block, -1)[..., :K]
    return (q.float() * s).to(dtype)


def fake_quant_act(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantise-dequantise activations exactly as the dynamic FP8 path does (same dtype out)."""
    q, s = quantize_act(x, block)
    return dequantize_act(q, s, block, x.dtype)


def fp8_block_matmul_reference(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
                               w_scale: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                               block: int = BLOCK) -> torch.Tensor:
    """Definition of the w8a8 block-scaled GEMM: x [M,K] (1×block scales [M,⌈K/b⌉]) times w [N,K]
    (block×block scales [⌈N/b⌉,⌈K/b⌉]) -> [M,N], accumulated in fp32 over K-blocks."""
    M, K = x_fp8.shape
    N = w_fp8.shape[0]
    out = torch.zeros(M, N, dtype=torch.float32, device=x_fp8.device)
    for kb in range(ceil_div(K, block)):
        k0, k1 = kb * block, min(K, (kb + 1) * block)
        partial = x_fp8[:, k0:k1].float() @ w_fp8[:, k0:k1].float().t()  # exact-ish fp32 products
        ws = w_scale[:, kb].float().repeat_interleave(block)[:N]
        out += partial * x_scale[:, kb, None].float() * ws[None, :]
    return out.to(out_dtype)


# ------------------------------------------------------------------------------------- which tensors
# Modules the official GLM-5-FP8 checkpoint keeps in bf16/fp32: norms, the router (and its bias), the
# indexer's weights_proj and k_norm, embeddings, lm_head and the MTP block's eh_proj/enorm/hnorm/shared_head.
# indexer.wq_b / indexer.wk ARE quantised (GLM-5.2-FP8 inventory, ROCm/ATOM); see architecture.md §4.
_KEEP_PATTERNS = ("layernorm", ".norm.", "k_norm", ".gate.weight", "e_score_correction_bias", "weights_proj",
                  "embed_tokens", "lm_head", "eh_proj", "enorm", "hnorm", "shared_head")


def is_fp8_quantizable(file_key: str, shape: tuple | None = None) -> bool:
    """Whether a checkpoint tensor is stored as FP8 in the GLM-5-FP8 layout (2-D Linear weights only)."""
    if not file_key.endswith(".weight"):
        return False
    if shape is not None and len(shape) != 2:
        return False
    return not any(p in file_key for p in _KEEP_PATTERNS)


def _sort_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def modules_to_not_convert(kept_keys) -> list[str]:
    """``modules_to_not_convert`` in the official per-layer pattern, derived from the tensors actually kept.

    For a kept ``X.weight`` the entry is the module ``X``; other kept tensors (``k_norm.bias``,
    ``mlp.gate.e_score_correction_bias``) are listed by their full name, as the official list does.
    Where ``self_attn.indexer.weights_proj`` is kept we list it under its real name *and* add the
    official checkpoint's misspelt ``self_attn.indexers_proj``: the misspelt entry matches no module (it
    is there so the list reads like the official one), the real name keeps loaders that trust the list
    (vLLM-style, or transformers without ``_keep_in_fp32_modules``) from expecting an FP8 ``weights_proj``.
    Loaders should still decide per tensor by the presence of ``weight_scale_inv``.
    """
    out = set()
    for k in kept_keys:
        if k.endswith(".weight"):
            mod = k[: -len(".weight")]
            out.add(mod)
            if mod.endswith(".self_attn.indexer.weights_proj"):
                out.add(mod[: -len(".indexer.weights_proj")] + ".indexers_proj")
        else:
            out.add(k)
    return sorted(out, key=_sort_key)


def quantization_config(kept_keys, block: int = BLOCK) -> dict:
    """The ``quantization_config`` entry of an FP8 checkpoint's ``config.json`` (GLM-5-FP8 fields)."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [block, block],
        "modules_to_not_convert": modules_to_not_convert(kept_keys),
    }
