"""The engine computes what the model computes: greedy output equals a full no-cache recompute, token for token,
whatever the batching, chunking, cache budget or attention path."""

import torch

from glm5.engine import LLM, SamplingParams
from glm5.engine.kv_cache import PagedKVCache
from glm5.engine.model_runner import Chunk, ModelRunner

from .conftest import TOPK, decode_after_prefill, make_model, prompts, ref_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _check(llm, model, ps, n=10):
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == ref_greedy(model, p, n), f"prompt of {len(p)} tokens diverged"
        assert o.outputs[0].finish_reason == "length"
    return outs


def test_greedy_equals_full_recompute_short_and_long_prompts(nano):
    # shorter than index_topk (dense-equivalent DSA) and longer (sparse top-k at prefill and decode)
    ps = prompts([3, TOPK - 1, TOPK + 1, 3 * TOPK + 5, 40])
    llm = LLM(nano, max_num_seqs=8, block_size=4)
    _check(llm, nano, ps)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks - 1


def test_dsa_is_really_sparse_in_decode(nano):
    # with a long context the sparse engine follows the sparse model, and the dense engine the dense model
    p = prompts([50], seed=5)
    sparse = LLM(nano, block_size=4).generate(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0))
    dense = LLM(nano, block_size=4, dsa="dense").generate(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                           logprobs=0))
    assert sparse[0].outputs[0].token_ids == ref_greedy(nano, p[0], 6, dsa="sparse")
    assert dense[0].outputs[0].token_ids == ref_greedy(nano, p[0], 6, dsa="dense")
    lp_s = [list(d.values())[0] for d in sparse[0].outputs[0].logprobs]
    lp_d = [list(d.values())[0] for d in dense[0].outputs[0].logprobs]
    assert max(abs(a - b) for a, b in zip(lp_s, lp_d)) > 1e-4  # the top-k selection changes the numbers


def test_chunked_prefill_and_tiny_blocks(nano):
    ps = prompts([29, 7, 45], seed=1)
    llm = LLM(nano, block_size=2, max_num_batched_tokens=8, max_num_seqs=3)
    _check(llm, nano, ps)
    assert llm.engine.stats["steps"] > 15  # the 45-token prompt alone needs 6 chunks


def test_preemption_under_a_tiny_cache_budget(nano):
    ps = prompts([30, 25, 20, 12], seed=2)
    llm = LLM(nano, block_size=4, num_blocks=16, max_model_len=56, max_num_seqs=4, enable_prefix_caching=False)
    outs = _check(llm, nano, ps, n=12)
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics["preemptions"] for o in outs) > 0
    assert llm.engine.block_manager.num_free_blocks == 15


def test_prefix_cache_reuse(nano):
    base = prompts([24], seed=3)[0]
    llm = LLM(nano, block_size=4)
    first = _check(llm, nano, [base + [5, 6]])
    second = _check(llm, nano, [base + [7, 8, 9]])
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens == 24  # six full blocks of the shared prefix
    assert llm.engine.block_manager.prefix_hits >= 24


def test_absorbed_decode_matches_expanded_attention():
    # The latent-space (absorbed) attention and the decompressed one agree to fp32 rounding, dense and sparse.
    model = make_model(seed=7)
    cfg = model.config
    for T in (TOPK - 2, 37):  # all keys, then DSA gather of the top-k latent rows
        logits = {}
        for name, max_q in (("absorbed", 16), ("expanded", 0)):
            kv = PagedKVCache(cfg, 40, 4, cfg.num_hidden_layers, torch.float32, "cpu")
            runner = ModelRunner(model, kv, 4, absorbed_max_q=max_q)
            toks = prompts([T + 3], seed=T)[0]
            table = list(range(1, 40))
            ids, pos, batch = runner.build([Chunk(table, 0, toks[:T])])
            runner.forward(ids, pos, batch)  # prefill (expanded either way: T > max_q)
            ids, pos, batch = runner.build([Chunk(table, T, toks[T:])])  # 3 query tokens on T cached keys
            assert batch.groups[0].absorbed == (name == "absorbed")
            logits[name] = runner.logits(runner.forward(ids, pos, batch))
        torch.testing.assert_close(logits["absorbed"], logits["expanded"], rtol=1e-4, atol=1e-4)


def test_attention_gathers_only_topk_rows():
    # Poison every latent row outside the indexer's top-k: the decode logits must not change.
    model = make_model(seed=8)
    cfg = model.config
    kv = PagedKVCache(cfg, 40, 4, cfg.num_hidden_layers, torch.float32, "cpu")
    runner = ModelRunner(model, kv, 4)
    toks = prompts([41], seed=9)[0]
    table = list(range(1, 40))
    ids, pos, batch = runner.build([Chunk(table, 0, toks[:40])])
    runner.forward(ids, pos, batch)
    selected = {}
    layers = model.model.layers[: cfg.num_hidden_layers]
    for i, layer in enumerate(layers):
        def rec(scores, _orig=layer.self_attn.indexer.select, _i=i):
            selected[_i] = _orig(scores)
            return selected[_i]
        layer.self_attn.indexer.select = rec
    try:
        ids, pos, batch = runner.build([Chunk(table, 40, toks[40:])])
        clean = runner.logits(runner.forward(ids, pos, batch))
    finally:
        for layer in layers:
            del layer.self_attn.indexer.select
    for i in range(cfg.num_hidden_layers):
        sel = batch.groups[0].kv_slots.gather(1, selected[i].view(1, -1)).view(-1)
        assert sel.numel() == TOPK
        keep = torch.zeros(kv.latent[i].shape[0], dtype=torch.bool)
        keep[sel] = True
        keep[batch.slot_mapping] = True  # the row written this step
        kv.latent[i][~keep] = 1e4
    ids, pos, batch = runner.build([Chunk(table, 40, toks[40:])])
    poisoned = runner.logits(runner.forward(ids, pos, batch))
    torch.testing.assert_close(poisoned, clean, rtol=1e-5, atol=1e-5)


def test_cuda_graph_static_layout_matches_eager_decode(nano):
    # The CUDA-graph decode path (batch padded to a bucket, keys padded to max_model_len, layout computed from block
    # tables inside the graph) run eagerly on CPU: same logits as the dynamic path. (Capture itself needs CUDA.)
    from glm5.engine.static_decode import StaticDecodeRunner

    runner, chunks, hidden = decode_after_prefill(nano, [5, 30, 13], seed=13)  # below/above index_topk
    eager = runner.logits(hidden)
    static = StaticDecodeRunner(runner, max_num_seqs=4, max_model_len=72, capture=False).run(chunks)  # bucket 4: 1 pad row
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    assert static.argmax(-1).tolist() == eager.argmax(-1).tolist()


def test_cuda_graph_static_verification_rows_match_eager(nano):
    # MTP verification through the graph path (run eagerly on CPU): sequences of 1, 3 and 4 rows padded to R = 4
    # rows each and to a batch bucket of 4; the real rows' hidden states and logits equal the dynamic path's.
    from glm5.engine.static_decode import StaticDecodeRunner

    # prompts below / above index_topk
    runner, chunks, hidden = decode_after_prefill(nano, [5, 30, 13], seed=15, drafts=[[], [7, 9], [11, 3, 5]])
    graphs = StaticDecodeRunner(runner, max_num_seqs=4, max_model_len=72, capture=False)
    assert graphs.run_rows(chunks, 3) is None  # a sequence with more rows than the graph has: eager
    h, logits = graphs.run_rows(chunks, 4)
    torch.testing.assert_close(h, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, runner.logits(hidden), rtol=1e-5, atol=1e-5)
    assert logits.argmax(-1).tolist() == runner.logits(hidden).argmax(-1).tolist()


def test_gathers_reuse_one_scratch_buffer_per_name(nano):
    from glm5.model.cache import GatherScratch, gather_rows

    store = torch.randn(50, 6)
    sc = GatherScratch()
    idx = torch.randint(0, 50, (3, 7))
    a = gather_rows(store, idx, sc, "latents")
    torch.testing.assert_close(a, store[idx], rtol=0, atol=0)
    ptr = a.data_ptr()
    b = gather_rows(store, idx[:2], sc, "latents")  # smaller: same memory
    assert b.data_ptr() == ptr and torch.equal(b, store[idx[:2]])
    c = gather_rows(store, torch.randint(0, 50, (5, 9)), sc, "latents")  # larger: the buffer grows
    assert c.shape == (5, 9, 6)
    assert gather_rows(store, idx, sc, "index_keys").data_ptr() != gather_rows(store, idx, sc, "latents").data_ptr()
    # the engine's attention gathers through its cache's scratch on CPU, and still equals the no-cache model
    llm = LLM(nano, max_num_seqs=4, block_size=4)
    eng = llm.engine
    ps = prompts([TOPK + 9, 5])
    for p in ps:
        eng.add_request(p, GREEDY)
    eng.step()  # prefill
    eng.step()  # decode: the long prompt's indexer keys and its top-k latent rows
    assert set(eng.kv_cache.scratch._buffers) >= {"latents", "index_keys"}
    while eng.has_unfinished_requests():
        eng.step()
    assert not eng.kv_cache.scratch._buffers  # idle: buffers released
    _check(llm, nano, ps)


def test_long_prefill_attends_over_the_gathered_top_k(nano, monkeypatch):
    # With T/k large, sparse prefill gathers each query's top-k latent rows (in blocks of queries under the
    # gather budget) instead of masking dense attention. Greedy output still equals the no-cache model, and the
    # first token's log-probability equals the masked path's.
    from glm5.model import mla

    calls = []
    orig = mla.MLAttention._absorbed_attention

    def spy(self, qn, *a, **kw):
        calls.append(qn.shape[1])
        return orig(self, qn, *a, **kw)

    monkeypatch.setattr(mla.MLAttention, "_absorbed_attention", spy)
    monkeypatch.setattr(mla, "_GATHER_BUDGET_BYTES", 16 * TOPK * 40 * 4)  # 16 queries per block
    ps = prompts([150, 120], seed=7)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    outs = LLM(nano, block_size=8, max_num_seqs=2).generate(ps, params)
    assert max(calls) >= 120  # prefill queries went through the gathered path
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == ref_greedy(nano, p, 4)
    monkeypatch.setattr(mla.MLAttention, "gathered_sparse_pays", lambda *a: False)
    masked = LLM(nano, block_size=8, max_num_seqs=2).generate(ps, params)
    for o, m in zip(outs, masked):
        a, b = o.outputs[0].logprobs[0], m.outputs[0].logprobs[0]
        assert a.keys() == b.keys() and abs(list(a.values())[0] - list(b.values())[0]) < 1e-4
