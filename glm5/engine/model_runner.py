"""Runs the model on a flattened batch: builds the paged-attention layout, calls the model's own modules.

A step's work is a list of ``Chunk``s (a sequence's block table, the position of its first new token and
its new tokens). They are concatenated into one row ``input_ids [1, N]`` / ``position_ids [1, N]`` and
run through ``GLM5Model.forward`` (the same module tree the trainer uses) with an ``AttentionContext`` whose
cache is the paged latent cache plus a ``PagedBatch`` describing where every query and key lives. Chunks
of at most ``absorbed_max_q`` tokens (decode, MTP verification and drafts) run absorbed (latent MQA, DSA
gather); longer ones (prefill) decompress the latents, each in its own group.

The MTP layer runs through ``MTPLayer.step`` (the module ``GLM5ForCausalLM.mtp_forward`` uses); depth d of
the draft chain writes to its own cache layer ``num_hidden_layers + d - 1`` (see spec_decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm5.engine.kv_cache import PagedCacheView, PagedKVCache
from glm5.model.cache import AttentionContext, AttnGroup, PagedBatch

ABSORBED_MAX_Q = 16


@dataclass
class Chunk:
    block_table: list[int]
    start: int  # position of the first new token
    token_ids: list[int]

    @property
    def n(self) -> int:
        return len(self.token_ids)


class _LayerShiftView(PagedCacheView):
    """Cache view that sends the MTP layer's reads and writes to the cache layer of one draft depth."""

    def __init__(self, store, batch, src: int, dst: int, scratch: bool = True):
        super().__init__(store, batch, scratch)
        self._src, self._dst = src, dst

    def _map(self, layer: int) -> int:
        return self._dst if layer == self._src else layer

    def write(self, layer, slot_mapping, c_kv, k_pe, k_idx):
        super().write(self._map(layer), slot_mapping, c_kv, k_pe, k_idx)

    def latents(self, layer):
        return super().latents(self._map(layer))

    def index_keys(self, layer):
        return super().index_keys(self._map(layer))


class ModelRunner:
    def __init__(self, model, kv_cache: PagedKVCache, block_size: int, dsa: str = "sparse",
                 absorbed_max_q: int = ABSORBED_MAX_Q, head=None):
        self.model = model
        self.cfg = model.config
        self.kv = kv_cache
        self.block_size = block_size
        self.dsa = dsa
        self.absorbed_max_q = absorbed_max_q
        self.device = model.device
        self._no_mask = torch.empty(0, dtype=torch.bool, device=self.device)
        self.graphs = None  # StaticDecodeRunner, set by the engine (CUDA graphs, or compile_decode on CPU)
        # the LM head's product: the module, or a cpu_layout.PackedHead (several rows on CPU, where it is faster)
        self.head_linear = head or model.lm_head

    # ------------------------------------------------------------------------------------- layout
    def _group(self, entries: list[tuple[int, list[int], int, int]], absorbed: bool, T: int | None = None) -> AttnGroup:
        """entries: (flat offset, block table, start position, num tokens); T: pad keys to this length."""
        dev, bs = self.device, self.block_size
        S = max(e[3] for e in entries)
        T = max(T or 0, max(e[2] + e[3] for e in entries))
        nb = -(-T // bs)
        bt = torch.tensor([(e[1] + [0] * nb)[:nb] for e in entries], dtype=torch.long, device=dev)
        meta = torch.tensor([[e[0], e[2], e[3]] for e in entries], dtype=torch.long, device=dev)
        off, p0, n = meta[:, 0:1], meta[:, 1:2], meta[:, 2:3]
        t = torch.arange(T, device=dev)
        kv_slots = bt[:, t // bs] * bs + t % bs  # [B,T]; positions past a table read the null block 0
        s = torch.arange(S, device=dev)[None]
        q_valid = s < n  # [B,S]
        q_pos = p0 + s
        q_index = torch.where(q_valid, off + s, 0)
        visible = (t[None, None] <= q_pos[..., None]) & q_valid[..., None]
        if S == 1:
            q_rows = torch.arange(len(entries), device=dev)
        else:
            q_rows = torch.tensor([b * S + i for b, e in enumerate(entries) for i in range(e[3])], dtype=torch.long,
                                  device=dev)
        return AttnGroup(q_index=q_index, q_valid=q_valid, kv_slots=kv_slots, visible=visible, absorbed=absorbed,
                         q_rows=q_rows, q_flat=q_index.view(-1)[q_rows])

    def build(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, PagedBatch]:
        """-> input_ids [N], positions [N], PagedBatch."""
        bs = self.block_size
        ids, pos, slots = [], [], []
        single, multi, expanded = [], [], []
        for c in chunks:
            off = len(ids)
            ids.extend(c.token_ids)
            bt = c.block_table
            for p in range(c.start, c.start + c.n):
                pos.append(p)
                slots.append(bt[p // bs] * bs + p % bs)
            e = (off, bt, c.start, c.n)
            (single if c.n == 1 else multi if c.n <= self.absorbed_max_q else expanded).append(e)
        dev = self.device
        # Groups are padded rectangles, so keep unlike shapes apart: one-token decodes together, short multi-token
        # chunks (MTP verification, prefill tails) together, and each long prefill chunk on its own.
        groups = [self._group(g, True) for g in (single, multi) if g]
        groups += [self._group([e], False) for e in expanded]
        batch = PagedBatch(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), groups=groups)
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                batch)

    # ------------------------------------------------------------------------------------ forwards
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """Main model on the flat batch -> final normed hidden states [N,H]."""
        return self.run_model(input_ids, positions, batch)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    # Undecorated bodies of forward / logits, for callers that set the grad mode themselves: torch.compile (the
    # decode graphs) cannot trace into an inference_mode context it did not start.
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch,
                  scratch: bool = True) -> torch.Tensor:
        ctx = AttentionContext(mask=self._no_mask, cache=self.kv.view(batch, scratch), dsa=self.dsa)
        return self.model.model(input_ids[None], positions[None], ctx)[0]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_linear(hidden).float()

    @torch.inference_mode()
    def mtp(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch,
            depth: int) -> torch.Tensor:
        """One MTP step for draft depth ``depth`` (1-based): hidden [N,H] = h^{depth-1}, input_ids [N] = the
        tokens ``depth`` positions ahead -> h^depth [N,H] (un-normed, as ``mtp_forward`` returns it)."""
        return self.run_mtp(hidden, input_ids, positions, batch, depth)

    def run_mtp(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch,
                depth: int, scratch: bool = True) -> torch.Tensor:  # the body of ``mtp``, undecorated (see run_model)
        m = self.model.model
        L = self.cfg.num_hidden_layers
        view = _LayerShiftView(self.kv, batch, src=L, dst=L + depth - 1, scratch=scratch)
        ctx = AttentionContext(mask=self._no_mask, cache=view, dsa=self.dsa)
        emb = m.embed_tokens(input_ids[None])
        rope = m.rotary(positions[None], emb.dtype)
        return m.mtp.step(emb, hidden[None].to(emb.dtype), rope, ctx)[0]

    @torch.inference_mode()
    def mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.mtp_head(h)

    def mtp_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_linear(self.model.model.mtp.shared_head.norm(h)).float()

    def idle(self) -> None:
        """Nothing is running: give the cache's gather buffers back (see glm5.model.cache.GatherScratch)."""
        if self.kv.scratch is not None:
            self.kv.scratch.clear()

    # ------------------------------------------------------------------------------- one-call decode
    def decode(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain decode (one token per sequence) -> (final hidden states [B,H], logits [B,V]): every row is sampled,
        so no row selection; replays a CUDA graph when one fits."""
        if self.graphs is not None:
            out = self.graphs.run_rows(chunks, 1)
            if out is not None:
                return out
        ids, pos, batch = self.build(chunks)
        hidden = self.forward(ids, pos, batch)
        return hidden, self.logits(hidden)
