"""Multi-head Latent Attention with DeepSeek Sparse Attention (GLM-5's ``self_attn``).

Queries go through a low-rank bottleneck (q_a_proj → RMSNorm → q_b_proj); keys and values share one
compressed latent c_kv (kv_a_proj_with_mqa → RMSNorm) plus a single rope key k_pe shared by all heads.
Only (c_kv, k_pe, indexer key) are cached; this module re-expands the history through kv_b_proj, as
transformers 5.23 does. Softmax scale is qk_head_dim^-0.5 (no YaRN mscale). Under DSA, when it costs less
(``gathered_sparse_pays``: long sequences, small latents, CPU), the forward instead gathers each query's top-k
latent rows and attends in latent space, as decode does: the same function, fewer FLOPs.

The inference engine runs the same module with a paged cache (``_paged_forward``): decode attends in the
latent space with absorbed projections and, under DSA, over the indexer's top-k latent rows only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.model.cache import AttentionContext, gather_rows
from glm5.model.dsa import LightningIndexer, indexer_kl_loss, selection_mask
from glm5.model.norm import RMSNorm
from glm5.model.rope import apply_rope

# Cap on the gathered rows of one layer in the sparse-attention path (see MLAttention.gathered_sparse_pays):
# glibc's largest mmap threshold. Above it every fresh [B·S, k, r+dr] tensor is new mmapped memory that page-faults
# on first touch; glm5-small at 2,048 tokens (168 MB per layer) measured 30% slower that way, at par without.
_GATHER_BUDGET_BYTES = 32 << 20
# FLOP-equivalents per gathered latent element (the gather, the backward's scatter-add, the per-query small
# GEMMs), measured on glm5-tiny, fp32, the 2-core CPU: forward + backward of the gathered path cost 6.8× the
# masked SDPA's per (query, key) pair there.
_GATHERED_ELEM_COST = 64


class MLAttention(nn.Module):
    def __init__(self, cfg: GLM5Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.d_nope, self.d_rope, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.d_qk = cfg.qk_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = self.d_qk ** -0.5
        self.rope_interleave = cfg.rope_interleave
        self.index_topk = cfg.index_topk
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # 1e-6, not rms_norm_eps (matches HF)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.d_qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_rank + self.d_rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.d_v, cfg.hidden_size, bias=False)
        full = layer_idx >= cfg.num_hidden_layers or cfg.layer_indexer_types[layer_idx] == "full"
        self.indexer = LightningIndexer(
            cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim,
            cfg.index_topk, cfg.indexer_rope_interleave) if full else None

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> per-head keys and values: c_kv [B,T,r], k_pe [B,T,dr] -> K [B,h,T,dqk], V [B,h,T,dv]."""
        B, T, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(B, self.n_heads, T, self.d_rope)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        if ctx.cache is not None and getattr(ctx.cache, "paged", False):
            return self._paged_forward(x, rope, ctx)
        B, S, _ = x.shape
        cos, sin = rope  # [B,S,dr/2]
        q_resid = self.q_a_layernorm(self.q_a_proj(x))  # [B,S,q_lora]
        q = self.q_b_proj(q_resid).view(B, S, self.n_heads, self.d_qk).transpose(1, 2)  # [B,h,S,dqk]
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], self.rope_interleave)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B,S,r]
        k_pe = apply_rope(k_pe, cos, sin, self.rope_interleave)  # [B,S,dr]

        # Indexer keys are computed (and cached) whenever this layer has an indexer, so a cache filled in
        # dense mode can still be decoded sparsely.
        idx_in = x.detach() if ctx.indexer_loss else x
        k_idx = None
        if self.indexer is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and ctx.indexer_loss is not None):
                k_idx = self.indexer.keys(idx_in, cos, sin)
        if ctx.cache is not None:
            c_kv, k_pe, k_idx = ctx.cache.update(self.layer_idx, c_kv, k_pe, k_idx)
        T = c_kv.shape[1]
        visible = ctx.mask  # [B,1,S,T]
        if visible.shape[-1] != T or visible.shape[-2] != S:
            raise ValueError(f"attention mask {tuple(visible.shape)} does not match {S} queries × {T} keys")

        index_scores = None
        allowed = visible
        # With T ≤ index_topk the top-k keeps every key, so sparse attention is exactly dense attention and
        # the indexer's scores are only needed for its training loss.
        all_kept = T <= self.index_topk
        if self.indexer is not None and ((ctx.dsa == "sparse" and not all_kept) or ctx.indexer_loss):
            with torch.set_grad_enabled(torch.is_grad_enabled() and ctx.indexer_loss is not None):
                index_scores = self.indexer.scores(idx_in, q_resid.detach() if ctx.indexer_loss else q_resid,
                                                   cos, sin, k_idx, visible[:, 0])
            ctx.topk_indices = self.indexer.select(index_scores.detach())
        if ctx.dsa == "sparse" and not all_kept:
            if ctx.topk_indices is None:
                raise ValueError(f"layer {self.layer_idx} shares top-k but no earlier layer has an indexer")
            selected = selection_mask(ctx.topk_indices, T)  # [B,S,T]
            allowed = visible & selected[:, None]
            if ctx.record_topk is not None:
                ctx.record_topk.append(ctx.topk_indices)

        topk = ctx.topk_indices if ctx.dsa == "sparse" and not all_kept else None
        kl = ctx.indexer_loss is not None and index_scores is not None  # this layer adds the indexer's loss
        if topk is not None and self.gathered_sparse_pays(B, S, T, topk.shape[-1], x):
            # latent rows of the whole batch, [B*T, r+dr]; key t of sequence b is row b*T + t
            latents = torch.cat([c_kv, k_pe], dim=-1).reshape(B * T, self.kv_rank + self.d_rope)
            slots = torch.arange(B * T, device=x.device).view(B, T)
            out = self._absorbed_attention(q_nope.transpose(1, 2), q_pe.transpose(1, 2), latents, slots,
                                           visible[:, 0], topk, return_probs=kl)
            if kl:
                # the KL over the selected keys, on the [B,S,k] entries it ranges over (equal to masking [B,S,T])
                out, probs = out
                probs = probs.view(B, S, self.n_heads, -1).transpose(1, 2)  # [B,h,S,k]
                keep = visible[:, 0].gather(-1, topk)  # [B,S,k]
                ctx.aux_losses.append(indexer_kl_loss(index_scores.gather(-1, topk), probs, keep))
            return self.o_proj(out)

        k, v = self.expand_kv(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if kl:
            out, probs = _eager_attention(q, k, v, allowed, self.scale)
            keep = visible[:, 0] if ctx.indexer_loss == "dense" else allowed[:, 0]
            ctx.aux_losses.append(indexer_kl_loss(index_scores, probs, keep))
        else:
            out = _sdpa(q, k, v, allowed, self.scale)
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.d_v)
        return self.o_proj(out)

    # ---------------------------------------------------------------------------------------- engine path
    # The inference engine flattens the new tokens of many sequences into one row (x [1,N,H]) and passes a
    # paged latent cache (glm5.model.cache: ``paged`` caches, PagedBatch / AttnGroup). The projections, norms
    # and RoPE are the same modules and math as ``forward``, on token-major tensors; what differs is the paged
    # cache write and the attention:
    #   * absorbed groups (decode, MTP verification): MQA over the latent rows [c_kv ‖ k_pe] with the query
    #     folded through W_UK and the output through W_UV, never decompressing the history; with DSA only
    #     the indexer's top-k latent rows are gathered;
    #   * expanded groups (prefill): decompress the history through kv_b_proj as above.
    def absorbed_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [h, d_nope, r] and W_UV [h, d_v, r] (views of the weight, no copy). An FP8
        kv_b_proj (``dequantized_weight``) is dequantised once and cached until its weight changes."""
        lin = self.kv_b_proj
        if hasattr(lin, "dequantized_weight"):
            key = (lin.weight.data_ptr(), lin.weight._version, lin.weight_scale_inv._version, dtype)
            cached = self.__dict__.get("_absorbed_fp8")
            if cached is None or cached[0] != key:
                cached = (key, lin.dequantized_weight(dtype or torch.float32))
                self.__dict__["_absorbed_fp8"] = cached
            w = cached[1]
        else:
            w = lin.weight
        w = w.view(self.n_heads, self.d_nope + self.d_v, self.kv_rank)
        return w[:, : self.d_nope], w[:, self.d_nope:]

    def _paged_forward(self, x, rope, ctx: AttentionContext):
        """Engine path. x [1,N,H]: the new tokens of every sequence in the batch, flattened. The projections are
        those of ``forward`` (q_pe and k_pe are rotated in one call: same elementwise math), on token-major
        tensors [N, ...]; attention runs per group of sequences (see glm5.model.cache.AttnGroup)."""
        cache, batch = ctx.cache, ctx.cache.batch
        scratch = getattr(cache, "scratch", None)
        h, dn, r = self.n_heads, self.d_nope, self.kv_rank
        xf = x[0]
        N = xf.shape[0]
        cos, sin = rope[0][0], rope[1][0]  # [N,dr/2]
        q_resid = self.q_a_layernorm(self.q_a_proj(xf))  # [N,q_lora]
        q = self.q_b_proj(q_resid).view(N, h, self.d_qk)
        ckv = self.kv_a_proj_with_mqa(xf)  # [N,r+dr]
        c_kv = self.kv_a_layernorm(ckv[:, :r])
        pe = apply_rope(torch.cat([q[..., dn:], ckv[:, None, r:]], dim=1), cos[:, None], sin[:, None],
                        self.rope_interleave)  # [N,h+1,dr]: the h query heads and the shared key
        qn, qp, k_pe = q[..., :dn], pe[:, :h], pe[:, h]
        k_idx = self.indexer.keys(xf, cos, sin) if self.indexer is not None else None
        cache.write(self.layer_idx, batch.slot_mapping, c_kv, k_pe, k_idx)
        latents = cache.latents(self.layer_idx)  # [num_slots, r + dr]
        if self.indexer is not None or ctx.dsa != "sparse":
            ctx.topk_indices = [None] * len(batch.groups)
        elif ctx.topk_indices is None:
            raise ValueError(f"layer {self.layer_idx} shares top-k but no earlier layer has an indexer")
        single = len(batch.groups) == 1 and batch.groups[0].q_flat.shape[0] == N
        out = None if single else xf.new_zeros(N, h * self.d_v)
        for gi, g in enumerate(batch.groups):
            T = g.kv_slots.shape[1]
            ident = g.q_index.shape[1] == 1 and single  # decode batch in flat order: views, not gathers
            qi = g.q_index
            topk = None
            if ctx.dsa == "sparse":
                if self.indexer is not None:
                    # Short-context shortcut: with T ≤ index_topk the top-k keeps every visible key, so DSA is
                    # exactly dense attention and the indexer scores are not needed (its keys were cached above).
                    if T > self.indexer.topk:
                        if ident:
                            args = (xf[:, None], q_resid[:, None], cos[:, None], sin[:, None])
                        else:
                            args = (xf[qi], q_resid[qi], cos[qi], sin[qi])
                        scores = self.indexer.paged_scores(*args, cache.index_keys(self.layer_idx), g.kv_slots,
                                                           g.visible, scratch)  # [B,S,T]
                        topk = self.indexer.select(scores)  # [B,S,k]
                    ctx.topk_indices[gi] = topk
                else:
                    topk = ctx.topk_indices[gi]
            qn_g, qp_g = (qn[:, None], qp[:, None]) if ident else (qn[qi], qp[qi])
            if g.absorbed:
                o = self._absorbed_attention(qn_g, qp_g, latents, g.kv_slots, g.visible, topk, scratch)
            else:
                o = self._expanded_attention(qn_g, qp_g, latents, g.kv_slots, g.visible, topk, scratch)
            o = o.reshape(-1, o.shape[-1])
            if single and g.q_rows.shape[0] == o.shape[0]:
                out = o.index_select(0, _inverse_order(g)) if not ident else o
            else:
                if out is None:
                    out = xf.new_zeros(N, h * self.d_v)
                out.index_copy_(0, g.q_flat, o[g.q_rows].to(out.dtype))
        return self.o_proj(out[None])

    def gathered_sparse_pays(self, B: int, S: int, T: int, k: int, x: torch.Tensor) -> bool:
        """Sparse attention for S queries over T keys, k selected each: gather each query's k latent rows and
        attend in latent space (``SelectedLatentAttention``), or decompress all T keys and mask all but k (dense
        FLOPs, what transformers does)? Per (query, key) pair the gathered path does h·(2r+dr) FLOPs, plus the
        gather, its scatter-add in the backward and small per-query products, ~``_GATHERED_ELEM_COST`` FLOPs
        per latent element; masked SDPA does h·(d_qk+d_v) FLOPs per pair, over all T keys. So gathering wins
        once T/k exceeds ~6.6 for glm5-tiny and ~3 at GLM-5's shapes. Under autograd, which keeps every layer's
        gathered rows [B·S, k, r+dr], they must also stay under ``_GATHER_BUDGET_BYTES`` (see there): that rules
        out glm5-small's k = 256 and GLM-5's k = 2048 at training lengths. Without autograd (prefill) the queries
        are gathered in blocks under the budget. CPU only, where it was measured; GPUs keep masked SDPA."""
        if x.device.type != "cpu":
            return False
        h, r, dr = self.n_heads, self.kv_rank, self.d_rope
        gathered = S * k * (h * (2 * r + dr) + _GATHERED_ELEM_COST * (r + dr)) + S * h * r * (self.d_nope + self.d_v)
        masked = S * T * h * (self.d_qk + self.d_v) + T * h * r * (self.d_nope + self.d_v)
        # autograd keeps every layer's rows; without it they are gathered in blocks of queries under the budget
        rows_bytes = B * S * k * (r + dr) * x.element_size() if torch.is_grad_enabled() else 0
        return gathered < masked and rows_bytes <= _GATHER_BUDGET_BYTES

    def _absorbed_attention(self, qn, qp, latents, kv_slots, visible, topk, scratch=None, return_probs=False):
        """qn [B,S,h,dn], qp [B,S,h,dr] -> [B,S,h*dv], attending in latent space (one shared KV "head").
        With ``return_probs`` (only with ``topk``) also the attention probabilities over the selected keys,
        [B*S,h,k] fp32."""
        B, S, h, _ = qn.shape
        r = self.kv_rank
        w_uk, w_uv = self.absorbed_weights(qn.dtype)
        q_lat = torch.bmm(qn.reshape(B * S, h, self.d_nope).transpose(0, 1), w_uk).transpose(0, 1)  # [B*S,h,r]
        q = torch.cat([q_lat, qp.reshape(B * S, h, self.d_rope)], dim=-1)  # [B*S,h,r+dr]
        if topk is None:  # every key of the sequence (dense, or T ≤ index_topk)
            rows = gather_rows(latents, kv_slots, scratch, "latents")  # [B,T,r+dr]
            scores = torch.matmul(q.view(B, S * h, -1), rows.transpose(1, 2)).view(B, S, h, -1)
            ok = _safe(visible)[:, :, None]  # [B,S,1,T]
            # in place on the fresh product: two [B,S,h,T] temporaries fewer (8 MB each at 32K, 64 heads)
            probs = torch.softmax(scores.mul_(self.scale).masked_fill_(~ok, float("-inf")).float(), dim=-1)
            o_lat = torch.matmul(probs.to(rows.dtype).view(B, S * h, -1), rows[..., :r])  # [B,S*h,r]
        else:  # DSA: gather only the selected latent rows
            k = topk.shape[-1]
            sel = kv_slots.gather(1, topk.reshape(B, S * k)).view(B * S, k)
            ok = _safe(visible.gather(-1, topk)).view(B * S, 1, k)
            # on CPU without autograd, blocks of queries keep each gather under the budget (a long prefill)
            n = B * S
            if latents.device.type == "cpu" and not torch.is_grad_enabled():
                n = max(1, _GATHER_BUDGET_BYTES // (k * latents.shape[-1] * latents.element_size()))
            outs = [SelectedLatentAttention.run(q[i:i + n], latents, sel[i:i + n], ok[i:i + n], self.scale, r,
                                                scratch) for i in range(0, B * S, n)]
            o_lat = torch.cat([o for o, _ in outs]) if len(outs) > 1 else outs[0][0]  # [B*S,h,r]
            if return_probs:
                probs = torch.cat([p for _, p in outs]) if len(outs) > 1 else outs[0][1]
        o = torch.bmm(o_lat.reshape(B * S, h, r).transpose(0, 1), w_uv.transpose(1, 2))  # [h,B*S,dv] = o_lat · W_UVᵀ
        o = o.transpose(0, 1).reshape(B, S, h * self.d_v)
        return (o, probs) if return_probs else o

    def _expanded_attention(self, qn, qp, latents, kv_slots, visible, topk, scratch=None):
        """Prefill: decompress the sequence's latents to per-head K/V (the same math as ``forward``). Under DSA,
        when it costs less (a long context), attend over the top-k latent rows instead, as ``forward`` does."""
        B, S = qn.shape[:2]
        if topk is not None and self.gathered_sparse_pays(B, S, kv_slots.shape[1], topk.shape[-1], qn):
            return self._absorbed_attention(qn, qp, latents, kv_slots, visible, topk, scratch)
        c_kv, k_pe = gather_rows(latents, kv_slots, scratch, "latents").split([self.kv_rank, self.d_rope], dim=-1)
        k, v = self.expand_kv(c_kv, k_pe)
        q = torch.cat([qn, qp], dim=-1).transpose(1, 2)  # [B,h,S,dqk]
        allowed = visible if topk is None else visible & selection_mask(topk, visible.shape[-1])
        out = _sdpa(q, k, v, allowed[:, None], self.scale)  # [B,h,S,dv]
        return out.transpose(1, 2).reshape(B, S, self.n_heads * self.d_v)


class SelectedLatentAttention(torch.autograd.Function):
    """Attention of N queries over their own k selected latent rows (DSA in latent space):
    q [N,h,D] (D = r+dr, the query folded through W_UK ‖ its rope part), latents [M,D], sel [N,k] row ids,
    ok [N,1,k] bool -> o_lat [N,h,r] and the probabilities [N,h,k] (fp32 or wider; no gradient).

    Written out because autograd's version of these five ops is slow where it matters, training on a CPU: the
    slice ``rows[..., :r]`` and the two uses of the gathered rows make it zero-fill and then add a second
    [N,k,D] gradient. Here the rows' gradient is one product, [dS | P]ᵀ·[q | dO], added straight into the
    latents' gradient."""

    @staticmethod
    def run(q, latents, sel, ok, scale: float, r: int, scratch=None):
        """(o_lat, probs): without autograd the math runs directly (``apply`` costs ~40 µs a call, per layer
        and decode step); with it, through the hand-written backward."""
        if torch.is_grad_enabled() and (q.requires_grad or latents.requires_grad):
            return SelectedLatentAttention.apply(q, latents, sel, ok, scale, r, scratch)
        return _selected_latent_attention(q, latents, sel, ok, scale, r, scratch)[:2]

    @staticmethod
    def forward(ctx, q, latents, sel, ok, scale: float, r: int, scratch=None):
        o_lat, probs, rows = _selected_latent_attention(q, latents, sel, ok, scale, r, scratch)
        if any(ctx.needs_input_grad[:2]):
            if scratch is not None:
                raise ValueError("SelectedLatentAttention: a scratch buffer cannot be kept for the backward pass")
            ctx.save_for_backward(q, rows, probs, sel)
            ctx.scale, ctx.r, ctx.num_latents = scale, r, latents.shape[0]
        ctx.mark_non_differentiable(probs)
        return o_lat, probs

    @staticmethod
    def backward(ctx, grad_o, _grad_probs):
        q, rows, probs, sel = ctx.saved_tensors
        r, dt = ctx.r, rows.dtype
        grad_o = grad_o.to(dt)
        dp = torch.matmul(grad_o, rows[..., :r].transpose(1, 2)).to(probs.dtype)  # [N,h,k]
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))  # softmax backward; masked keys have p = 0
        ds = (ds * ctx.scale).to(dt)
        grad_q = torch.matmul(ds, rows) if ctx.needs_input_grad[0] else None  # [N,h,D]
        grad_latents = None
        if ctx.needs_input_grad[1]:
            lhs = torch.cat([ds, probs.to(dt)], dim=1).transpose(1, 2)  # [N,k,2h]
            rhs = torch.cat([q, F.pad(grad_o, (0, q.shape[-1] - r))], dim=1)  # [N,2h,D]
            grad_rows = torch.bmm(lhs, rhs)  # [N,k,D]: from the scores and from the output, one product
            grad_latents = rows.new_zeros(ctx.num_latents, rows.shape[-1])
            grad_latents.index_add_(0, sel.reshape(-1), grad_rows.view(-1, rows.shape[-1]))
        return grad_q, grad_latents, None, None, None, None, None


def _selected_latent_attention(q, latents, sel, ok, scale: float, r: int, scratch=None):
    """The forward math of :class:`SelectedLatentAttention`; also returns the gathered rows [N,k,D]."""
    rows = gather_rows(latents, sel, scratch, "latents")  # [N,k,D]
    scores = torch.matmul(q, rows.transpose(1, 2))  # [N,h,k]
    # scaled and masked in place on the fresh product: two [N,h,k] temporaries fewer (autograd never sees these
    # ops: they run inside the Function's forward or without grad)
    acc = torch.promote_types(scores.dtype, torch.float32)  # fp32 softmax for bf16 (fp64 stays fp64)
    probs = torch.softmax(scores.mul_(scale).masked_fill_(~ok, float("-inf")).to(acc), dim=-1)
    o_lat = torch.matmul(probs.to(rows.dtype), rows[..., :r])  # [N,h,r]
    return o_lat, probs, rows


def _inverse_order(g) -> torch.Tensor:
    """For a group whose padded queries are exactly the batch's N tokens: flat token i -> its padded row."""
    inv = torch.empty_like(g.q_flat)
    inv[g.q_flat] = g.q_rows
    return inv


def _safe(mask: torch.Tensor) -> torch.Tensor:
    # A query with no visible key (a padding position) would give NaN; let it see everything instead.
    # Its output is meaningless either way and never feeds a real token.
    return mask | ~mask.any(-1, keepdim=True)


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_safe(mask), scale=scale)


def _eager_attention(q, k, v, mask, scale):
    """Attention that also returns the fp32 probabilities [B,h,S,T] (needed by the indexer loss)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~_safe(mask), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(v.dtype), v), probs
