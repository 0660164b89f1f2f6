"""The lightning indexer's scores and their gradients against the formula written out directly:
I[t,s] = Σ_h (weights_proj(x)[t,h] / √H) · ReLU(q[t,h]·k[s] / √d), masked keys at -inf."""

import math

import pytest
import torch

from glm5.model.dsa import LightningIndexer, indexer_kl_loss
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


@pytest.mark.parametrize("visibility", ["random", "causal_prefill"])
@pytest.mark.parametrize("chunk_keys", [128, 256, 10_000])
def test_paged_scores_equal_gathered_scores_bit_for_bit(monkeypatch, chunk_keys, visibility):
    # The engine scores cached keys chunk by chunk straight from the paged store (gather, score, next chunk);
    # that must give exactly the scores of gathering every key first, or top-k could flip on a near-tie.
    # Shapes near the engine's (chunks of hundreds of keys, head_dim 64+): BLAS may sum tiny products differently.
    import glm5.model.dsa as dsa

    torch.manual_seed(2)
    D = 64
    ix = LightningIndexer(hidden_size=32, q_lora_rank=24, n_heads=8, head_dim=D, rope_dim=8, topk=4)
    B, S, T, slots = 2, 3, 600, 1500
    if visibility == "causal_prefill":  # queries at positions 300..599: late key chunks are seen by late queries only
        S = 300
    store = torch.randn(slots, D)
    kv_slots = torch.stack([torch.randperm(slots)[:T] for _ in range(B)])  # scattered, as in a paged cache
    x, q_resid, ang = torch.randn(B, S, 32), torch.randn(B, S, 24), torch.randn(B, S, 4)
    visible = torch.rand(B, S, T) > 0.2
    if visibility == "causal_prefill":
        visible = torch.arange(T)[None, None] <= (T - S + torch.arange(S))[None, :, None].expand(B, S, T)
    monkeypatch.setattr(dsa, "_MIN_KEY_CHUNK", 1)
    monkeypatch.setattr(dsa, "_KEY_CHUNK_BYTES", 4 * B * D * chunk_keys)
    with torch.no_grad():
        whole = ix.scores(x, q_resid, ang.cos(), ang.sin(), store[kv_slots], visible)
        paged = ix.paged_scores(x, q_resid, ang.cos(), ang.sin(), store, kv_slots, visible)
    assert torch.equal(paged, whole)


@pytest.mark.parametrize("layout", ["causal", "left_padded", "packed_documents"])
def test_causal_blocks_skip_unseen_keys_without_changing_a_score(layout):
    # On CPU, score_keys scores each block of queries only up to the last key the block sees. Every kept score is
    # the same dot product, so the scores must be bit-identical to scoring all keys and masking.
    from glm5.model.dsa import score_keys

    torch.manual_seed(3)
    B, S, Hi, D = 2, 300, 4, 32
    q, w = torch.randn(B, S, Hi, D, requires_grad=True), torch.randn(B, S, Hi, requires_grad=True)
    keys = torch.randn(B, S, D, requires_grad=True)
    visible = torch.ones(S, S, dtype=torch.bool).tril().expand(B, S, S).clone()
    if layout == "left_padded":
        visible[1, :, :70] = False  # the second sequence starts at position 70
        visible[1, :70] = False
    elif layout == "packed_documents":
        visible[:, 150:, :150] = False  # a second document from position 150
    got = score_keys(q, w, keys, visible)
    ref = score_keys(q, w, keys).masked_fill(~visible, float("-inf"))
    assert torch.equal(got, ref)
    with torch.no_grad():  # the no-autograd path writes the blocks into one buffer
        assert torch.equal(score_keys(q, w, keys, visible), ref)
    g = torch.randn(B, S, S).masked_fill(~visible, 0.0)
    ours = torch.autograd.grad((got.masked_fill(~visible, 0.0) * g).sum(), [q, w, keys])
    theirs = torch.autograd.grad((ref.masked_fill(~visible, 0.0) * g).sum(), [q, w, keys])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # sums over other key widths: rounding only


def test_selected_latent_attention_gradients():
    # The hand-written backward of DSA's gathered latent attention against finite differences (float64), with
    # masked selections, a query whose selection is masked all but once, and rows chosen by several queries.
    from glm5.model.mla import SelectedLatentAttention

    torch.manual_seed(4)
    N, h, r, dr, M, k = 6, 3, 5, 2, 9, 4
    q = torch.randn(N, h, r + dr, dtype=torch.float64, requires_grad=True)
    latents = torch.randn(M, r + dr, dtype=torch.float64, requires_grad=True)
    sel = torch.stack([torch.randperm(M)[:k] for _ in range(N)])
    ok = torch.rand(N, 1, k) > 0.3
    ok[:, :, 0] = True
    ok[2, :, 1:] = False

    def f(q, latents):
        return SelectedLatentAttention.apply(q, latents, sel, ok, 0.7, r)[0]

    assert torch.autograd.gradcheck(f, (q, latents))
    o, probs = SelectedLatentAttention.apply(q, latents, sel, ok, 0.7, r)
    with torch.no_grad():  # inference skips the autograd.Function (its call overhead), same numbers
        o2, probs2 = SelectedLatentAttention.run(q, latents, sel, ok, 0.7, r)
    assert torch.equal(o2, o.detach()) and torch.equal(probs2, probs)
    rows = latents[sel]  # [N,k,r+dr]
    scores = (torch.einsum("nhd,nkd->nhk", q, rows) * 0.7).masked_fill(~ok, float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1))
    torch.testing.assert_close(o, torch.einsum("nhk,nkr->nhr", scores.softmax(-1), rows[..., :r]))


@pytest.mark.parametrize("indexer_loss", [None, "sparse"])
def test_gathered_sparse_attention_equals_the_masked_dense_path(monkeypatch, indexer_loss):
    # Training-time DSA attends either over the k gathered latent rows per query or over every key with all but k
    # masked (what transformers computes); which one is a cost decision. Same logits, indexer KL and gradients.
    from glm5.config import preset
    from glm5.model import mla
    from glm5.model.transformer import GLM5ForCausalLM

    cfg = preset("glm5-nano", index_topk=8)
    model = GLM5ForCausalLM(cfg).init_weights(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(5))
    attn = model.model.layers[0].self_attn
    assert attn.gathered_sparse_pays(2, 128, 128, 8, torch.zeros(1))  # this shape takes the gathered path
    assert not attn.gathered_sparse_pays(2, 128, 128, 64, torch.zeros(1))  # T/k = 2: masked SDPA is cheaper

    def run():
        model.zero_grad()
        out = model(ids, dsa="sparse", indexer_loss=indexer_loss)
        loss = out.logits.logsumexp(-1).mean() + sum(out.aux_losses, torch.zeros(()))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), [float(a.detach()) for a in out.aux_losses], grads

    gathered = run()
    monkeypatch.setattr(mla.MLAttention, "gathered_sparse_pays", lambda *a: False)
    masked = run()
    torch.testing.assert_close(gathered[0], masked[0], rtol=1e-5, atol=1e-5)
    assert len(gathered[1]) == len(masked[1]) == (cfg.num_hidden_layers if indexer_loss else 0)
    torch.testing.assert_close(gathered[1], masked[1], rtol=1e-5, atol=1e-6)
    assert gathered[2].keys() == masked[2].keys()
    for name in masked[2]:
        torch.testing.assert_close(gathered[2][name], masked[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_indexer_kl_loss_by_hand():
    """The indexer's objective, written out per query: p = attention summed over heads and renormalised over the
    kept keys, q = softmax of the indexer scores over the kept keys, KL(p ‖ q) = Σ p·log(p/q); averaged over the
    queries that keep any key. Its gradient w.r.t. the scores is (q − p)/#queries on kept keys, 0 elsewhere."""
    g = torch.Generator().manual_seed(0)
    H, T = 3, 5
    attn = torch.softmax(torch.randn(1, H, 3, T, generator=g), -1)  # each head sums to 1 over all T keys
    scores = torch.randn(1, 3, T, generator=g, requires_grad=True)
    keep = torch.tensor([[[1, 1, 0, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]]], dtype=torch.bool)  # query 2: none
    loss = indexer_kl_loss(scores, attn, keep)
    kls, grad = [], torch.zeros(1, 3, T)
    for s in (0, 1):
        kept = keep[0, s].nonzero().flatten().tolist()
        a = [sum(attn[0, h, s, k].item() for h in range(H)) for k in kept]
        p = [v / sum(a) for v in a]
        z = sum(math.exp(scores[0, s, k].item()) for k in kept)
        q = [math.exp(scores[0, s, k].item()) / z for k in kept]
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        for k, pi, qi in zip(kept, p, q):
            grad[0, s, k] = (qi - pi) / 2
    assert float(loss.detach()) == pytest.approx(sum(kls) / 2, rel=1e-5)
    (g_scores,) = torch.autograd.grad(loss, scores)
    torch.testing.assert_close(g_scores, grad, rtol=1e-4, atol=1e-6)
