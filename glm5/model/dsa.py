"""DeepSeek Sparse Attention: the lightning indexer, its top-k selection and its training loss.

The indexer scores every visible key for every query with a cheap multi-head ReLU dot product,
``I[t,s] = Σ_h w[t,h] · ReLU(q[t,h]·k[s] / √d)``, and attention is then restricted to the top-k keys
per query. It matches transformers 5.23.0: interleaved RoPE on the *first* ``qk_rope_head_dim`` dims
(split [rope | nope], the reverse of main attention), LayerNorm (eps 1e-6, with bias) on the key,
fp32 scoring, ``weights_proj`` scaled by n_heads^-0.5 (here with the 1/√d folded in, which commutes with
the ReLU: equal up to fp32 rounding), masked keys at -inf, ``topk(min(k, T))``.

For T ≤ index_topk the selection keeps every visible key, so DSA equals dense causal attention.
"""

from __future__ import annotations

import torch
from torch import nn

from glm5.model.cache import GatherScratch, gather_rows
from glm5.model.rope import apply_rope

# Upper bound on the fp32 elements of one [B, chunk, H, T] score block; prefill is chunked over queries
# so a long prompt never materialises the whole [B, S, H, T] tensor.
_SCORE_BLOCK_ELEMS = 1 << 26
# Keys scored per gather in the paged (engine) path: ~2 MB of fp32 keys, which stay in a CPU's L2/L3 cache
# between their gather and the score GEMM (see LightningIndexer.paged_scores).
_KEY_CHUNK_BYTES = 2 << 20
_MIN_KEY_CHUNK = 512  # fewer keys per chunk would cost more in per-chunk dispatch than the cache saves
# Queries per block when score_keys skips the keys no query of the block sees (CPU, causal masks)
_MIN_CAUSAL_BLOCK = 64


class LightningIndexer(nn.Module):
    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int,
                 topk: int, rope_interleave: bool = True):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.topk = n_heads, head_dim, rope_dim, topk
        self.rope_interleave = rope_interleave
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)

    def _rope_first(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(rot, cos, sin, self.rope_interleave), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Indexer keys for new tokens (what the cache stores): x [B,S,H] -> [B,S,head_dim]."""
        return self._rope_first(self.k_norm(self.wk(x)), cos, sin)

    def query(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer queries q [B,S,Hi,D] and per-head weights w [B,S,Hi], both fp32, from x [B,S,hidden] and
        q_resid [B,S,q_lora]."""
        B, S, _ = x.shape
        q = self.wq_b(q_resid).view(B, S, self.n_heads, self.head_dim)  # [B,S,Hi,D]
        q = self._rope_first(q, cos.unsqueeze(2), sin.unsqueeze(2)).float()
        # The positive 1/√d commutes with the ReLU, so it is folded into the per-head weights: one pass over the
        # [B,c,Hi,T] score block (and its gradient) fewer, the largest tensors the indexer makes.
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * (self.n_heads * self.head_dim) ** -0.5
        return q, w

    def scores(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Index scores I [B,S,T] in fp32, -inf where ``visible`` ([B,S,T] bool) is False.

        x: [B,S,hidden], q_resid: [B,S,q_lora], keys: [B,T,head_dim] (cached + new).
        """
        q, w = self.query(x, q_resid, cos, sin)
        return score_keys(q, w, keys, visible)

    def paged_scores(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     store: torch.Tensor, kv_slots: torch.Tensor, visible: torch.Tensor,
                     scratch: GatherScratch | None = None) -> torch.Tensor:
        """:meth:`scores` for keys held in a paged cache: ``store`` [slots, head_dim] and ``kv_slots`` [B,T], the
        slot of each key. Equal bit for bit to gathering every key and calling :meth:`scores`.

        Why chunks on CPU: gathering a whole long context first writes and then rereads it from memory (16 MB of
        fp32 keys per layer at 32K), which left GLM-5's indexer decode memory-bound. Scoring each ~2 MB chunk
        right after its gather, while it is still in cache, took it from 9 to 6 ms per layer. A key's score does
        not depend on the other keys, so chunking over keys changes no sum (the test checks MKL's products agree
        bit for bit). On a GPU one gather is better."""
        q, w = self.query(x, q_resid, cos, sin)
        B, S = q.shape[:2]
        T = kv_slots.shape[1]
        # Compiled (CPU compile_decode): one chunk. Inductor fuses the gather into the scoring anyway, and a chunk
        # size computed from T would make the compiled step specialise on T, one compilation per context length.
        chunk = T if q.device.type != "cpu" or torch.compiler.is_compiling() else \
            max(_MIN_KEY_CHUNK, _KEY_CHUNK_BYTES // (4 * B * self.head_dim))
        # Equal chunks (none of a few keys): BLAS may sum a product with very few columns in another order.
        chunk = -(-T // -(-T // chunk))
        if chunk >= T:
            return score_keys(q, w, gather_rows(store, kv_slots, scratch, "index_keys"), visible)
        out = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            s0 = 0
            if S > 1:  # a causal prefill's early queries see none of a late chunk's keys: start at the first that does
                seen = visible[..., t0:t1].any(-1).any(0).nonzero()  # queries (of any sequence) seeing the chunk
                if not len(seen):
                    continue  # left unscored: every entry is invisible, so the mask below fills it
                s0 = int(seen[0])
            keys = gather_rows(store, kv_slots[:, t0:t1], scratch, "index_keys")
            out[:, s0:, t0:t1] = score_keys(q[:, s0:], w[:, s0:], keys)
        return out.masked_fill_(~visible, float("-inf"))

    def select(self, index_scores: torch.Tensor) -> torch.Tensor:
        """Top-k key indices per query: [B,S,T] -> [B,S,min(topk,T)] (int64). Deterministic torch.topk."""
        k = min(self.topk, index_scores.shape[-1])
        return index_scores.topk(k, dim=-1).indices


def score_keys(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Σ_h w[b,s,h] · ReLU(q[b,s,h]·k[b,t]): q [B,S,Hi,D] and w [B,S,Hi] fp32, keys [B,T,D] -> [B,S,T] fp32.

    With ``visible`` ([B,S,T] bool) the scores are -inf where it is False, and on CPU each block of queries is
    scored only up to the last key any of them sees: under a causal mask that skips nearly half the product
    (a training step or a long prefill). The skipped scores would be masked anyway, and each kept score is
    the same dot product, so the result is unchanged."""
    B, S, Hi, D = q.shape
    T = keys.shape[1]
    kT = keys.float().transpose(1, 2)  # [B,D,T]
    # compiled (decode steps, a few queries): one block, as a block size computed from T would specialise on T
    chunk = S if torch.compiler.is_compiling() else max(1, _SCORE_BLOCK_ELEMS // max(1, B * Hi * T))
    causal_blocks = visible is not None and q.device.type == "cpu" and S >= 2 * _MIN_CAUSAL_BLOCK
    if causal_blocks:
        chunk = min(chunk, max(_MIN_CAUSAL_BLOCK, -(-S // 8)))
    # without autograd the blocks are written into one buffer (no pad, cat or out-of-place mask copies of [B,S,T])
    grad = torch.is_grad_enabled() and (q.requires_grad or w.requires_grad or keys.requires_grad)
    buf = None if grad or visible is None else torch.empty(B, S, T, dtype=torch.float32, device=q.device)
    out = []
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        c = s1 - s0
        t1 = T
        if causal_blocks:
            seen = visible[:, s0:s1].reshape(-1, T).any(0).nonzero()
            # at least a few keys: BLAS may sum a product with very few columns in another order
            t1 = min(T, max(int(seen[-1]) + 1 if len(seen) else 1, _MIN_CAUSAL_BLOCK))
        # one bmm over (query, head) rows: broadcasting a [B,1,D,T] key tensor would copy it per query
        # ReLU in place on the bmm output (bmm's backward does not need it), before the view: an in-place op
        # on a view would make autograd rebuild the base's gradient through as_strided
        per_head = torch.bmm(q[:, s0:s1].reshape(B, c * Hi, D), kT[..., :t1]).relu_()
        per_head = per_head.view(B, c, Hi, t1)  # [B,c,Hi,t1]
        block = torch.matmul(w[:, s0:s1].unsqueeze(-2), per_head).squeeze(-2)  # [B,c,t1]
        if buf is not None:
            buf[:, s0:s1, :t1] = block
            buf[:, s0:s1, t1:] = float("-inf")
            continue
        if t1 < T:
            block = torch.nn.functional.pad(block, (0, T - t1), value=float("-inf"))
        out.append(block)
    if buf is not None:
        return buf.masked_fill_(~visible, float("-inf"))
    scores = torch.cat(out, dim=1) if len(out) > 1 else out[0]
    return scores if visible is None else scores.masked_fill(~visible, float("-inf"))


def selection_mask(topk_indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B,S,k] key indices -> [B,S,T] bool, True at selected keys."""
    B, S, _ = topk_indices.shape
    mask = torch.zeros(B, S, num_keys, dtype=torch.bool, device=topk_indices.device)
    return mask.scatter_(-1, topk_indices, True)


def indexer_kl_loss(index_scores: torch.Tensor, attn_probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """DSA indexer objective (DeepSeek-V3.2 recipe, adopted by GLM-5).

    index_scores: [B,S,T] indexer logits (with grad); attn_probs: [B,H,S,T] main attention
    probabilities (no grad); keep: [B,S,T] bool keys the loss ranges over (every visible key in the dense
    warm-up, the selected top-k in the sparse stage). Target p = Σ_heads attention, L1-normalised over
    ``keep``; loss = mean over queries of KL(p ‖ softmax(I) over ``keep``).
    """
    p = attn_probs.detach().float().sum(1).masked_fill(~keep, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    logq = torch.log_softmax(index_scores.float().masked_fill(~keep, float("-inf")), dim=-1)
    logq = logq.masked_fill(~keep, 0.0)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    kl = (plogp - p * logq).sum(-1)  # [B,S]
    has_keys = keep.any(-1)
    return kl[has_keys].mean() if bool(has_keys.any()) else index_scores.sum() * 0.0
