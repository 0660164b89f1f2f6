"""The paged latent KV cache: what MLA + DSA keep per token and layer, in fixed-size blocks.

Per layer (main layers, plus the MTP layer when speculative decoding is on) two tensors:
  latent [num_blocks * block_size, kv_lora_rank + qk_rope_head_dim]   the normalised c_kv ‖ rotated k_pe
  index  [num_blocks * block_size, index_head_dim]                     the indexer keys (layers with an indexer)
GLM-5: 576 + 128 numbers per token and layer, shared by all 64 heads (vs 64 × (256 + 256) for plain MHA).

With ``kv_cache_dtype="fp8"`` both are FP8 row stores in GLM-5's serving layouts (glm5/engine/kv_quant.py:
656 + 132 bytes per token and layer at GLM-5's widths), dequantised as attention gathers them.

``PagedKVCache.view(batch)`` returns the object MLAttention receives as its cache (the ``paged`` protocol in
glm5/model/cache.py): writes go to ``batch.slot_mapping``, reads index the flat slot dimension.
"""

from __future__ import annotations

import torch

from glm5.config import GLM5Config
from glm5.engine.kv_quant import Fp8Rows, cache_bytes_per_token, resolve_kv_cache_dtype
from glm5.model.cache import GatherScratch, PagedBatch


def bytes_per_block(cfg: GLM5Config, block_size: int, num_layers: int, dtype: torch.dtype,
                    kv_cache_dtype: str = "auto") -> int:
    types = cfg.layer_indexer_types + ["full"] * num_layers  # MTP depth layers always have an indexer
    idx_layers = sum(1 for t in types[:num_layers] if t == "full")
    latent, index = cache_bytes_per_token(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim,
                                          kv_cache_dtype, dtype)
    return (num_layers * latent + idx_layers * index) * block_size


class PagedKVCache:
    def __init__(self, cfg: GLM5Config, num_blocks: int, block_size: int, num_layers: int,
                 dtype: torch.dtype, device: torch.device | str, kv_cache_dtype: str = "auto"):
        self.cfg = cfg
        self.num_blocks, self.block_size, self.num_layers = num_blocks, block_size, num_layers
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        self.dtype, self.device = dtype, torch.device(device)
        self.latent: list = []
        self.index: list = []
        # CPU only: CUDA's caching allocator already reuses memory (and CUDA graphs capture their own buffers)
        self.scratch = GatherScratch() if self.device.type == "cpu" else None
        self.allocate()

    def allocate(self) -> None:
        """(Re)create the zeroed stores; the contents of any earlier ones are gone."""
        slots = self.num_blocks * self.block_size
        cfg, dtype, device = self.cfg, self.dtype, self.device
        r, dr, di = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
        self.latent_dim = r + dr
        types = cfg.layer_indexer_types + ["full"] * self.num_layers
        if self.kv_cache_dtype == "auto":
            self.latent = [torch.zeros(slots, self.latent_dim, dtype=dtype, device=device)
                           for _ in range(self.num_layers)]
            self.index = [torch.zeros(slots, di, dtype=dtype, device=device) if types[i] == "full" else None
                          for i in range(self.num_layers)]
        else:
            self.latent = [Fp8Rows(slots, r, dr, dtype, device) for _ in range(self.num_layers)]
            self.index = [Fp8Rows(slots, di, 0, dtype, device) if types[i] == "full" else None
                          for i in range(self.num_layers)]

    def release(self) -> None:
        """Drop every store (sleep mode): the memory goes back to the allocator until :meth:`allocate`."""
        self.latent, self.index = [], []
        if self.scratch is not None:
            self.scratch.clear()

    @property
    def allocated(self) -> bool:
        return bool(self.latent)

    def nbytes(self) -> int:
        return sum(t.nbytes() if isinstance(t, Fp8Rows) else t.numel() * t.element_size()
                   for t in self.latent + self.index if t is not None)

    def view(self, batch: PagedBatch, scratch: bool = True) -> "PagedCacheView":
        """``scratch=False``: attention gathers into fresh tensors, not the reusable buffers (compiled steps)."""
        return PagedCacheView(self, batch, scratch)


class PagedCacheView:
    """What one forward's attention layers see: the shared storage plus this step's batch layout."""

    paged = True

    def __init__(self, store: PagedKVCache, batch: PagedBatch, scratch: bool = True):
        self.store = store
        self.batch = batch
        self.scratch = store.scratch if scratch else None

    def write(self, layer: int, slot_mapping: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
              k_idx: torch.Tensor | None) -> None:
        lat, idx = self.store.latent[layer], self.store.index[layer]
        if isinstance(lat, Fp8Rows):
            lat.write(slot_mapping, c_kv, k_pe)
            if k_idx is not None:
                idx.write(slot_mapping, k_idx)
            return
        lat.index_copy_(0, slot_mapping, torch.cat([c_kv, k_pe], dim=-1).to(lat.dtype))
        if k_idx is not None:
            idx.index_copy_(0, slot_mapping, k_idx.to(idx.dtype))

    def latents(self, layer: int) -> torch.Tensor:
        return self.store.latent[layer]

    def index_keys(self, layer: int) -> torch.Tensor:
        return self.store.index[layer]

    def seq_length(self, layer: int = 0) -> int:  # the paged path never asks; kept for the duck type
        return 0
