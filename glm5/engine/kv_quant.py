"""FP8 paged KV cache: GLM-5's serving formats for the latent rows and the DSA indexer keys.

``kv_cache_dtype="fp8"`` (vLLM's option; also spelled ``fp8_e4m3`` / ``fp8_ds_mla``) stores, per token and layer,
the byte layouts production GLM-5 / DeepSeek-V3.2 servers use (chat-format-and-serving.md §3.2):

* latent row, FlashMLA's "fp8_ds_mla", 656 bytes at GLM-5's widths:
    [0, r)              c_kv as float8_e4m3fn, r = kv_lora_rank (512)
    [r, r + 4·t)        t float32 dequantisation scales, one per 128-value tile of c_kv (4)
    [r + 4·t, end)      the rotated rope key k_pe as bfloat16 (64 values): not quantised, for accuracy
* indexer key row, 132 bytes: index_head_dim (128) float8_e4m3fn values, then one float32 scale per tile.
  DeepSeek-V3.2 Hadamard-rotates its indexer queries and keys first. That is not done here: measured on keys with
  Gaussian, heavy-tailed and outlier-channel values, rotating left the error of q·k equal or worse (e4m3 is a
  floating-point format, so a small value keeps 3 mantissa bits of its own beside an outlier; the rotation helps
  integer formats and an FP8 query GEMM, which this cache does not use).

Against the bf16 cache of a GPU that is 788 instead of 1,408 bytes per token and layer (1.8× the tokens in the
same memory); against this project's fp32 CPU cache, 2,816 → 788 (3.6×). Each tile's scale is amax / 448 (e4m3's
largest finite value), so a value keeps e4m3's 3 mantissa bits relative to itself (error ≤ 2⁻⁴ of it), or is
within 2⁻¹⁰ · scale near zero (e4m3's subnormals). Reads dequantise the gathered rows to the model's dtype: the latent attention and the indexer then
run unchanged (the stores below follow the ``gather_rows`` protocol of glm5/model/cache.py).

The model's cache writes and reads therefore see rounded keys, exactly as in vLLM or SGLang with an FP8 KV
cache: the engine's outputs are close to the model's, no longer equal (``kv_cache_dtype="auto"``, the default,
keeps the model's dtype and the exact-equality guarantees).
"""

from __future__ import annotations

import torch

from glm5.model.cache import GatherScratch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_ds_mla")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
TILE = 128  # values per scale (FlashMLA's and the indexer's tile)
_MIN_SCALE = 1e-30  # an all-zero tile: any positive scale decodes it to zeros


def resolve_kv_cache_dtype(name: str) -> str:
    """'auto' (the model's dtype) or 'fp8_ds_mla' (the FP8 formats above); anything else is a ValueError."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return "auto" if name == "auto" else "fp8_ds_mla"


def tiles(dim: int) -> tuple[int, int]:
    """(number of scale tiles, values per tile): 128-value tiles, or one tile when ``dim`` is not a multiple of 128
    (the small presets' widths)."""
    tile = TILE if dim % TILE == 0 else dim
    return dim // tile, tile


def row_bytes(dim: int, rope_dim: int = 0) -> int:
    """Bytes of one stored row: ``dim`` e4m3 values, their float32 scales, ``rope_dim`` bf16 values."""
    return dim + 4 * tiles(dim)[0] + 2 * rope_dim


def cache_bytes_per_token(kv_lora_rank: int, rope_dim: int, index_head_dim: int, kv_cache_dtype: str,
                          dtype: torch.dtype) -> tuple[int, int]:
    """(latent bytes, indexer-key bytes) per token and layer for a cache of ``kv_cache_dtype``."""
    if resolve_kv_cache_dtype(kv_cache_dtype) == "auto":
        elem = torch.empty((), dtype=dtype).element_size()
        return (kv_lora_rank + rope_dim) * elem, index_head_dim * elem
    return row_bytes(kv_lora_rank, rope_dim), row_bytes(index_head_dim)


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, dim] -> (e4m3 values [N, dim], float32 scales [N, t]) with x ≈ values · scale per tile."""
    N, dim = x.shape
    t, tile = tiles(dim)
    xt = x.float().reshape(N, t, tile)
    scale = (xt.abs().amax(-1) / FP8_MAX).clamp_min_(_MIN_SCALE)  # [N,t]
    # clamp: x / (amax / 448) can round a hair past 448, and e4m3fn has no infinity to saturate to
    q = (xt / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(N, dim), scale


class Fp8Rows:
    """One layer's quantised rows: ``data`` [slots, row_bytes] uint8 in the layout above. Quacks like the fp32
    store it replaces where attention looks (``shape``, ``dtype``, ``device``, ``element_size``), with
    ``gather_rows`` dequantising what it gathers to ``dtype``."""

    requires_grad = False  # a cache, never trained through

    def __init__(self, slots: int, dim: int, rope_dim: int, dtype: torch.dtype, device: torch.device | str):
        if dim % 4:  # the float32 scales follow the e4m3 values and must start 4-byte aligned to be viewed in place
            raise ValueError(f"an FP8 KV cache needs widths divisible by 4, got {dim}")
        self.dim, self.rope_dim = dim, rope_dim
        self.num_tiles, self.tile = tiles(dim)
        self.data = torch.zeros(slots, row_bytes(dim, rope_dim), dtype=torch.uint8, device=device)
        self.dtype, self.device = dtype, self.data.device
        self.shape = torch.Size((slots, dim + rope_dim))  # the dequantised rows'
        self._like = torch.empty(0, dtype=dtype, device=self.device)  # for GatherScratch.get
        # CPU: e4m3 -> float32 through a 256-entry table (torch's own conversion is scalar there: ~4x slower)
        self._table = (torch.arange(256, dtype=torch.uint8).view(FP8).float().nan_to_num_(0.0)
                       if self.device.type == "cpu" else None)
        self._codes_like = torch.empty(0, dtype=torch.int32)

    def element_size(self) -> int:
        return self._like.element_size()

    def nbytes(self) -> int:
        return self.data.numel()

    def encode(self, values: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """values [N, dim] (and rope [N, rope_dim]) -> the rows' bytes [N, row_bytes] uint8."""
        q, scale = quantize_tiles(values)
        parts = [q.view(torch.uint8), scale.view(torch.uint8)]  # [N,dim], [N,4t]
        if self.rope_dim:
            parts.append(rope.to(torch.bfloat16).view(torch.uint8))  # [N,2·dr]
        return torch.cat(parts, dim=-1)

    def write(self, slot_mapping: torch.Tensor, values: torch.Tensor, rope: torch.Tensor | None = None) -> None:
        self.data.index_copy_(0, slot_mapping, self.encode(values, rope))

    def _buffer(self, scratch: GatherScratch | None, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        # the temporaries of a long gather are tens of MB: fresh ones would pay a page fault per 4 KB (cache.py)
        return torch.empty(numel, dtype=like.dtype, device=like.device) if scratch is None else \
            scratch.get(name, numel, like)

    def decode(self, raw: torch.Tensor, out: torch.Tensor, scratch: GatherScratch | None = None,
               name: str = "rows") -> torch.Tensor:
        """raw [n, row_bytes] uint8 (contiguous) -> out [n, dim + rope_dim] in ``dtype``; ``scratch`` holds the
        temporaries under ``name``-derived keys."""
        n, r, t = raw.shape[0], self.dim, self.num_tiles
        scale = raw[:, r:r + 4 * t].view(torch.float32)[..., None]  # [n,t,1] (aligned: r, row_bytes multiples of 4)
        dst = out[:, :r].view(n, t, self.tile)
        if self._table is not None:
            codes = self._buffer(scratch, name + ".codes", n * r, self._codes_like).view(n, r)
            codes.copy_(raw[:, :r])  # uint8 -> int32 table index
            if out.dtype == torch.float32 and not self.rope_dim:  # out is exactly the values: look up in place
                torch.index_select(self._table, 0, codes.view(-1), out=out.view(-1))
                dst.mul_(scale)
            else:
                vals = self._buffer(scratch, name + ".vals", n * r, self._table)
                torch.index_select(self._table, 0, codes.view(-1), out=vals)
                if out.dtype == torch.float32:
                    torch.mul(vals.view(n, t, self.tile), scale, out=dst)
                else:
                    dst.copy_(vals.view(n, t, self.tile).mul_(scale))
        else:
            dst.copy_(raw[:, :r].view(FP8).float().view(n, t, self.tile).mul_(scale))
        if self.rope_dim:
            out[:, r:].copy_(raw[:, r + 4 * t:].view(torch.bfloat16))
        return out

    def gather_rows(self, idx: torch.Tensor, scratch: GatherScratch | None = None, name: str = "rows") -> torch.Tensor:
        """Rows ``idx`` (any shape) dequantised -> [*idx.shape, dim + rope_dim] (see glm5.model.cache.gather_rows)."""
        flat = idx.reshape(-1)
        n, D = flat.numel(), self.shape[1]
        if scratch is None:
            raw, out = self.data.index_select(0, flat), torch.empty(n, D, dtype=self.dtype, device=self.device)
        else:
            raw = torch.index_select(self.data, 0, flat, out=scratch.get(name + ".fp8", n * self.data.shape[1],
                                                                           self.data).view(n, -1))
            out = scratch.get(name, n * D, self._like).view(n, D)
        return self.decode(raw, out, scratch, name).view(*idx.shape, D)
