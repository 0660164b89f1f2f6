"""Per-forward attention context and the simple contiguous latent KV cache.

The model is one set of modules for training, evaluation and inference. What changes between those
uses travels in an ``AttentionContext``: the visibility mask, an optional cache, whether DSA's top-k
applies, and whether to compute the indexer's training loss. The inference engine supplies its own
(paged) cache object with the same ``update`` method.

``LatentCache`` stores, per layer, only what MLA needs: the normalised KV latent c_kv
[B,T,kv_lora_rank], the rotated shared rope key k_pe [B,T,qk_rope_head_dim] and the indexer keys
[B,T,index_head_dim] — 576+128 numbers per token and layer for GLM-5, not 64×(256+256).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class LatentCache:
    """Contiguous growing cache (batch fixed at creation), for ``generate`` and tests."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.c_kv: list[torch.Tensor | None] = [None] * num_layers
        self.k_pe: list[torch.Tensor | None] = [None] * num_layers
        self.k_idx: list[torch.Tensor | None] = [None] * num_layers

    def seq_length(self, layer_idx: int = 0) -> int:
        t = self.c_kv[layer_idx]
        return 0 if t is None else t.shape[1]

    @staticmethod
    def _append(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
        if new is None:
            return old
        return new if old is None else torch.cat([old, new], dim=1)

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, k_idx: torch.Tensor | None):
        """Append this step's latents; return the full history (cached + new) for the layer."""
        self.c_kv[layer_idx] = self._append(self.c_kv[layer_idx], c_kv)
        self.k_pe[layer_idx] = self._append(self.k_pe[layer_idx], k_pe)
        self.k_idx[layer_idx] = self._append(self.k_idx[layer_idx], k_idx)
        return self.c_kv[layer_idx], self.k_pe[layer_idx], self.k_idx[layer_idx]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lst in (self.c_kv, self.k_pe, self.k_idx) for t in lst if t is not None)


@dataclass
class AttentionContext:
    """What one forward pass needs to know beyond the hidden states.

    mask: [B,1,S,T] bool, True where query s may attend key t (causal + padding / document masks).
    dsa: "sparse" applies the indexer's top-k (the model's real behaviour); "dense" ignores it.
    indexer_loss: None, "dense" (KL over all visible keys; warm-up stage) or "sparse" (KL over the
        selected keys); when set, the indexer runs with grad on detached inputs and each layer appends its
        loss to ``aux_losses``.
    """

    mask: torch.Tensor
    cache: object | None = None
    dsa: str = "sparse"
    indexer_loss: str | None = None
    aux_losses: list = field(default_factory=list)
    topk_indices: torch.Tensor | None = None  # last full indexer's selection, reused by "shared" layers
    record_topk: list | None = None  # if a list, each layer appends its top-k indices (tests, analysis)


def build_attention_mask(batch: int, q_len: int, past_len: int, device: torch.device,
                         padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal visibility [B,1,S,T] with T = past_len + q_len; padding_mask [B,T] (1 = real token) optional."""
    T = past_len + q_len
    q_pos = torch.arange(past_len, T, device=device)[:, None]
    k_pos = torch.arange(T, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, T)
    if padding_mask is not None:
        if padding_mask.shape != (batch, T):
            raise ValueError(f"attention_mask must be [batch, past+new] = {(batch, T)}, got {tuple(padding_mask.shape)}")
        mask = mask & padding_mask.bool()[:, None, None, :]
    return mask


# ------------------------------------------------------------------------------------------------------
# Engine contract: a paged latent cache and a flattened ("varlen") batch.
#
# The inference engine runs many sequences in one forward by flattening their new tokens into a single
# row: input_ids [1, N], position_ids [1, N]. Everything in the model is token-wise except attention, so
# only attention needs to know where each sequence's queries and keys are. The engine passes, as
# ``AttentionContext.cache``, an object with ``paged = True`` that
#   * stores per layer the latent rows [c_kv ‖ k_pe] ([num_slots, kv_lora_rank + qk_rope_head_dim]) and
#     the indexer keys ([num_slots, index_head_dim]) in fixed-size blocks (a slot = block * block_size + i),
#   * exposes ``write(layer, slot_mapping, c_kv, k_pe, k_idx)``, ``latents(layer)``, ``index_keys(layer)``,
#   * carries the step's ``batch: PagedBatch``,
#   * may carry ``scratch: GatherScratch`` (CPU), reusable buffers for the rows attention gathers.
# MLAttention then writes the new latents to their slots and attends per group (see mla.py).


class GatherScratch:
    """Named, growing 1-D buffers for gathered cache rows, reused from layer to layer and step to step.

    Why: a gather of a long context is a large fresh tensor every layer (GLM-5 at 32K tokens: 72 MB of fp32
    latents). glibc serves allocations above 32 MB with a new mmap, so each one pays a page fault per 4 KB
    page on first touch; measured, that was a third of the dense decode attention's CPU time. A buffer
    handed out by name is valid until the next request for the same name: callers use it within one
    attention call and keep nothing from it. The largest gather stays allocated until :meth:`clear`."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        """Release every buffer (the engine calls this when it goes idle, so they do not outlive the work)."""
        self._buffers.clear()

    def get(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]


def gather_rows(store: torch.Tensor, idx: torch.Tensor, scratch: GatherScratch | None = None,
                name: str = "rows") -> torch.Tensor:
    """``store[idx]`` for a 2-D cache store [slots, D] and an integer index of any shape -> [*idx.shape, D].
    ``index_select`` on the flattened index: a plain copy, several times faster on CPU than advanced indexing.
    With ``scratch``, the rows land in its buffer ``name`` (see :class:`GatherScratch` for the lifetime).
    ``store`` may also be any object with this method, e.g. an FP8 row store, which returns dequantised rows."""
    if not isinstance(store, torch.Tensor):  # a quantised store (glm5/engine/kv_quant.py) dequantises as it gathers
        return store.gather_rows(idx, scratch, name)
    flat, D = idx.reshape(-1), store.shape[-1]
    if scratch is None:
        return store.index_select(0, flat).view(*idx.shape, D)
    out = scratch.get(name, flat.numel() * D, store).view(flat.numel(), D)
    return torch.index_select(store, 0, flat, out=out).view(*idx.shape, D)


@dataclass
class AttnGroup:
    """Sequences attended together, padded to a rectangle.

    q_index [B,S] int64: flat token index (into the N new tokens) of query s of sequence b (pad: 0).
    q_valid [B,S] bool: real query or padding.
    kv_slots [B,T] int64: cache slot of key position t of sequence b (pad: any valid slot, e.g. 0).
    visible [B,S,T] bool: causal visibility (key t ≤ query position, t < sequence length; False for pads).
    absorbed: run MLA in latent space (MQA mode: q_nope·W_UK, attend over [c_kv ‖ k_pe], ·W_UV) — the
        decode / verification path; otherwise decompress keys and values through kv_b_proj (prefill).
    q_rows [n] int64: which of the B*S padded queries are real (flat row index into [B*S]).
    q_flat [n] int64: where those rows go in the flat batch (q_index.view(-1)[q_rows]).
    Only integer indexing is used on these (no boolean masks), so a fixed-shape group can be captured in a
    CUDA graph.
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor
    kv_slots: torch.Tensor
    visible: torch.Tensor
    absorbed: bool
    q_rows: torch.Tensor
    q_flat: torch.Tensor


@dataclass
class PagedBatch:
    """One engine forward: where each new token's latents go (``slot_mapping`` [N]) and the groups."""

    slot_mapping: torch.Tensor
    groups: list
