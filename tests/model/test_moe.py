"""MoE routing and the loop-free expert computation."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5 import GLM5ForCausalLM, preset
from glm5.model.moe import MoE, Experts, grouped_linear, route_tokens
from moe_oracle import select_experts_by_hand  # tests/moe_oracle.py (tests/ is on sys.path)


def test_route_tokens_bias_selects_but_does_not_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # pushes expert 3 into the top-2
    w, ids = route_tokens(logits, bias, top_k=2, normalize=True, scaling=2.5)
    assert set(ids[0].tolist()) == {0, 3}
    s = logits.sigmoid()[0]
    expect = torch.stack([s[i] for i in ids[0]]) / (s[0] + s[3]) * 2.5
    torch.testing.assert_close(w[0], expect)
    assert abs(w.sum().item() - 2.5) < 1e-6


def test_group_limited_routing_restricts_groups():
    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    w, ids = route_tokens(logits, torch.zeros(8), top_k=2, n_group=4, topk_group=1)
    assert ((ids // 2)[:, 0] == (ids // 2)[:, 1]).all()  # both experts from the single kept group


def _route_by_hand(logits, bias, top_k, n_group, topk_group, scaling):
    """DeepSeek-V3 ``noaux_tc`` routing one token at a time on Python floats (architecture.md §2.10):
    p = sigmoid(logits), sel = p + bias; keep the topk_group groups whose two best ``sel`` sum highest; the top_k
    experts by ``sel`` among the kept groups; gate weight = p (no bias) / Σ p over the chosen × scaling.
    Returns one {expert: weight} per token."""
    routes = []
    for row in logits.tolist():
        p = [1.0 / (1.0 + math.exp(-v)) for v in row]
        chosen = select_experts_by_hand([pi + bi for pi, bi in zip(p, bias.tolist())], top_k, n_group, topk_group)
        total = sum(p[e] for e in chosen)
        routes.append({e: p[e] / total * scaling for e in chosen})
    return routes


@settings(max_examples=60, deadline=None, derandomize=True)  # fixed examples: fp32 vs fp64 near-ties
@given(seed=st.integers(0, 2**31 - 1), n_group=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_route_tokens_matches_routing_by_hand(seed, n_group, data):
    """Group-limited top-k against the per-token loop above, with a correction bias large enough to change both
    which groups and which experts win: the chosen set and each chosen expert's weight must agree. Continuous
    random scores, so ties (where the order is backend-defined) have probability zero."""
    E = 16
    topk_group = data.draw(st.integers(1, n_group), label="topk_group")
    top_k = data.draw(st.integers(1, topk_group * (E // n_group)), label="top_k")
    scaling = data.draw(st.sampled_from([1.0, 2.5]), label="scaling")
    g = torch.Generator().manual_seed(seed)
    logits, bias = torch.randn(12, E, generator=g) * 2, torch.randn(E, generator=g) * 0.5
    w, ids = route_tokens(logits, bias, top_k, n_group, topk_group, normalize=True, scaling=scaling)
    for t, expect in enumerate(_route_by_hand(logits, bias, top_k, n_group, topk_group, scaling)):
        got = dict(zip(ids[t].tolist(), w[t].tolist()))
        assert got.keys() == expect.keys(), (t, sorted(got), sorted(expect))
        for e in expect:
            assert math.isclose(got[e], expect[e], rel_tol=1e-5), (t, e)


def test_router_uses_the_configs_scaling_groups_and_its_bias():
    """The ``mlp.gate`` module routes with the config's top-k, groups and routed_scaling_factor and its own
    ``e_score_correction_bias`` (the buffer the trainer's balancing moves), computed in fp32."""
    cfg = preset("glm5-nano", n_group=4, topk_group=2)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) * 0.2)
        moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.5)
    x = torch.randn(10, cfg.hidden_size, generator=g)
    logits, w, ids = moe.gate(x)
    torch.testing.assert_close(logits, x @ moe.gate.weight.T)
    expect = _route_by_hand(logits, moe.gate.e_score_correction_bias, cfg.num_experts_per_tok, cfg.n_group,
                            cfg.topk_group, cfg.routed_scaling_factor)
    unbiased = _route_by_hand(logits, torch.zeros(cfg.n_routed_experts), cfg.num_experts_per_tok, cfg.n_group,
                              cfg.topk_group, cfg.routed_scaling_factor)
    assert any(a.keys() != b.keys() for a, b in zip(expect, unbiased))  # the bias matters for these tokens
    for t, e in enumerate(expect):
        got = dict(zip(ids[t].tolist(), w[t].tolist()))
        assert got.keys() == e.keys() and all(math.isclose(got[k], e[k], rel_tol=1e-5) for k in e)
        assert math.isclose(sum(got.values()), cfg.routed_scaling_factor, rel_tol=1e-5)


def _experts(seed=0):
    torch.manual_seed(seed)
    e = Experts(6, 32, 16)
    with torch.no_grad():
        e.gate_up_proj.normal_(0, 0.1)
        e.down_proj.normal_(0, 0.1)
    return e


def test_grouped_experts_equal_reference_forward_and_backward():
    e = _experts()
    x = torch.randn(50, 32, requires_grad=True)
    ids = torch.randint(0, 5, (50, 2))  # expert 5 gets no tokens: empty groups must work
    ids[:, 1] = (ids[:, 0] + 1) % 5
    w = torch.rand(50, 2, requires_grad=True)
    y = e(x, ids, w)
    yr = e(x, ids, w, impl="reference")
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, e.gate_up_proj, e.down_proj], g, retain_graph=True)
    grads_r = torch.autograd.grad(yr, [x, w, e.gate_up_proj, e.down_proj], g)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    y.sum().backward()  # broadcast (stride-0) upstream gradient is accepted


def test_sort_and_batch_fallback_matches_grouped_mm(monkeypatch):
    import glm5.model.moe as moe

    torch.manual_seed(0)
    w = torch.randn(4, 8, 12)
    counts = torch.tensor([3, 0, 5, 2])
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(10, 12)
    a = grouped_linear(x, w, counts, offs)
    monkeypatch.setattr(moe, "_grouped_mm_ok", lambda x: False)
    b = grouped_linear(x, w, counts, offs)
    torch.testing.assert_close(a, b)


def test_model_grouped_vs_reference_experts_identical_logits():
    m = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0).eval()
    x = torch.randint(0, m.config.vocab_size, (2, 20))
    with torch.no_grad():
        a = m(x).logits
        m.set_experts_impl("reference")
        b = m(x).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_expert_load_recorded():
    m = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0).eval()
    x = torch.randint(0, m.config.vocab_size, (2, 20))
    with torch.no_grad():
        m(x)
    for _, moe in m.moe_layers()[:-1]:  # the MTP layer did not run
        assert moe.last_expert_load.sum().item() == 40 * m.config.num_experts_per_tok


def test_expert_counts_match_bincount():
    from glm5.model.moe import expert_counts

    g = torch.Generator().manual_seed(0)
    for n, k, e in ((1, 4, 32), (7, 2, 8), (64, 8, 256)):
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
        c = expert_counts(ids, e)
        assert c.shape == (e,) and c.dtype == torch.long
        assert torch.equal(c, torch.bincount(ids.reshape(-1), minlength=e))


def test_decode_loops_over_the_active_experts_only(monkeypatch):
    """Without autograd on CPU, a step whose tokens reach at most an eighth of the experts multiplies only those
    (torch._grouped_mm would visit all of them): the same products, so the same bits as the grouped GEMM."""
    torch.manual_seed(0)
    ex = Experts(32, 64, 48)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    for n in (1, 2, 6):
        x = torch.randn(n, 64)
        ids = torch.stack([torch.randperm(32)[:4] for _ in range(n)])
        w = torch.rand(n, 4)
        grouped = ex(x, ids, w)  # autograd on (the parameters require grad): torch._grouped_mm
        with torch.inference_mode():
            calls = []
            real = torch._grouped_mm
            monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
            loop = ex(x, ids, w)
            monkeypatch.setattr(torch, "_grouped_mm", real)
        active = int(ids.unique().numel())
        assert bool(calls) == (8 * active > 32), (n, active)  # 1 token: 4 experts of 32 take the loop
        assert torch.equal(loop, grouped.detach())


def test_a_bare_constructor_gives_finite_deterministic_weights():
    # GLM5ForCausalLM(cfg) without init_weights() once left the router and routed experts as torch.empty: whatever
    # memory they got, NaN included (an engine built on it failed with "non-finite logits" depending on the heap).
    # Deterministic mode fills uninitialised memory with NaN, so a parameter nobody initialises shows up here.
    from glm5 import GLM5ForCausalLM, preset

    cfg = preset("glm5-nano")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        a = GLM5ForCausalLM(cfg)
        torch.manual_seed(0)
        b = GLM5ForCausalLM(cfg)
    finally:
        torch.use_deterministic_algorithms(before)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name
    gate = a.model.layers[cfg.first_k_dense_replace].mlp
    assert 0.5 < gate.experts.down_proj.std().item() / cfg.initializer_range < 1.5
    assert 0.5 < gate.gate.weight.std().item() / cfg.initializer_range < 1.5
