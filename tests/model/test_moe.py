"""MoE routing and the loop-free expert computation."""

import torch

from glm5 import GLM5ForCausalLM, preset
from glm5.model.moe import Experts, grouped_linear, route_tokens


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
