"""The lightning indexer's scores and their gradients against the formula written out directly:
I[t,s] = Σ_h (weights_proj(x)[t,h] / √H) · ReLU(q[t,h]·k[s] / √d), masked keys at -inf."""

import pytest
import torch

from glm5.model.dsa import LightningIndexer
from glm5.model.rope import apply_rope


def _reference_scores(ix: LightningIndexer, x, q_resid, cos, sin, keys, visible):
    B, S, _ = x.shape
    q = ix.wq_b(q_resid).view(B, S, ix.n_heads, ix.head_dim)
    rot, rest = q.split([ix.rope_dim, ix.head_dim - ix.rope_dim], dim=-1)
    q = torch.cat([apply_rope(rot, cos.unsqueeze(2), sin.unsqueeze(2), ix.rope_interleave), rest], dim=-1)
    per_head = torch.relu(torch.einsum("bshd,btd->bsht", q.double(), keys.double()) * ix.head_dim ** -0.5)
    w = ix.weights_proj(x).double() * ix.n_heads ** -0.5
    return torch.einsum("bsh,bsht->bst", w, per_head).masked_fill(~visible, float("-inf"))


@pytest.mark.parametrize("S,T", [(5, 5), (3, 11)])
def test_scores_and_gradients_match_the_formula(S, T):
    torch.manual_seed(0)
    ix = LightningIndexer(hidden_size=32, q_lora_rank=24, n_heads=4, head_dim=16, rope_dim=8, topk=4)
    x, q_resid = torch.randn(2, S, 32), torch.randn(2, S, 24)
    ang = torch.randn(2, S, 4)
    cos, sin = ang.cos(), ang.sin()
    k_ang = torch.randn(2, T, 4)
    keys = ix.keys(torch.randn(2, T, 32), k_ang.cos(), k_ang.sin()).detach()
    visible = torch.rand(2, S, T) > 0.3
    got = ix.scores(x, q_resid, cos, sin, keys, visible)
    ref = _reference_scores(ix, x, q_resid, cos, sin, keys, visible)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin].double(), ref[fin], rtol=1e-5, atol=1e-6)
    # gradients of a loss over the finite scores, for every indexer parameter the scores depend on
    g = torch.randn_like(ref)
    params = [ix.wq_b.weight, ix.weights_proj.weight]
    ours = torch.autograd.grad((got[fin] * g[fin].float()).sum(), params)
    theirs = torch.autograd.grad((ref[fin] * g[fin]).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_chunked_scoring_equals_one_block(monkeypatch):
    # long prompts are scored in query chunks; the chunking must not change a single score
    import glm5.model.dsa as dsa

    torch.manual_seed(1)
    ix = LightningIndexer(hidden_size=32, q_lora_rank=24, n_heads=4, head_dim=16, rope_dim=8, topk=4)
    S = 9
    x, q_resid, ang = torch.randn(1, S, 32), torch.randn(1, S, 24), torch.randn(1, S, 4)
    keys = ix.keys(x, ang.cos(), ang.sin())
    visible = torch.ones(S, S, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        whole = ix.scores(x, q_resid, ang.cos(), ang.sin(), keys, visible)
        monkeypatch.setattr(dsa, "_SCORE_BLOCK_ELEMS", 4 * S * 2)  # two queries per chunk
        chunked = ix.scores(x, q_resid, ang.cos(), ang.sin(), keys, visible)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_keys", [128, 256, 10_000])
def test_paged_scores_equal_gathered_scores_bit_for_bit(monkeypatch, chunk_keys):
    # The engine scores cached keys chunk by chunk straight from the paged store (gather, score, next chunk);
    # that must give exactly the scores of gathering every key first, or top-k could flip on a near-tie.
    # Shapes near the engine's (chunks of hundreds of keys, head_dim 64+): BLAS may sum tiny products differently.
    import glm5.model.dsa as dsa

    torch.manual_seed(2)
    D = 64
    ix = LightningIndexer(hidden_size=32, q_lora_rank=24, n_heads=8, head_dim=D, rope_dim=8, topk=4)
    B, S, T, slots = 2, 3, 600, 1500
    store = torch.randn(slots, D)
    kv_slots = torch.stack([torch.randperm(slots)[:T] for _ in range(B)])  # scattered, as in a paged cache
    x, q_resid, ang = torch.randn(B, S, 32), torch.randn(B, S, 24), torch.randn(B, S, 4)
    visible = torch.rand(B, S, T) > 0.2
    monkeypatch.setattr(dsa, "_MIN_KEY_CHUNK", 1)
    monkeypatch.setattr(dsa, "_KEY_CHUNK_BYTES", 4 * B * D * chunk_keys)
    with torch.no_grad():
        whole = ix.scores(x, q_resid, ang.cos(), ang.sin(), store[kv_slots], visible)
        paged = ix.paged_scores(x, q_resid, ang.cos(), ang.sin(), store, kv_slots, visible)
    assert torch.equal(paged, whole)
