import math

import pytest
import torch

from glm5 import GLM5ForCausalLM, preset
from glm5.train.optim import Muon, build_optimizers, lr_factor, muon_layout, set_lr, zeropower_via_newtonschulz


def test_newton_schulz_orthogonalises_batches():
    torch.manual_seed(0)
    G = torch.randn(3, 32, 20) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    O = zeropower_via_newtonschulz(G)
    for i in range(3):
        s = torch.linalg.svdvals(O[i])
        assert s.min() > 0.5 and s.max() < 1.5  # ~US'V^T with S' near 1 whatever the scale of G
        assert torch.allclose(O[i], zeropower_via_newtonschulz(G[i]), atol=1e-5)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon not available")
def test_matches_torch_muon_bit_for_bit_on_matrices():
    torch.manual_seed(0)
    w0 = torch.randn(64, 48)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ref = torch.optim.Muon([a], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours = Muon([{"params": [b], "layout": {"batch": 1, "chunks": [64]}}], lr=0.02, weight_decay=0.1, ns_dtype="bfloat16")
    for _ in range(3):
        g = torch.randn(64, 48)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.equal(a, b) and not torch.equal(a, w0)


def _update(layout, g, **kw):
    p = torch.nn.Parameter(torch.zeros_like(g))
    opt = Muon([{"params": [p], "layout": layout}], lr=1.0, weight_decay=0.0, momentum=0.0, **kw)
    p.grad = g
    opt.step()
    return -p.detach()


def test_muon_split_orthogonalises_each_head():
    torch.manual_seed(0)
    heads, d, r = 4, 12, 16
    # one head's gradient is 1000× the others: per-head updates still have the same scale
    g = torch.randn(heads, d, r) * torch.tensor([1000.0, 1, 1, 1])[:, None, None]
    split = _update({"batch": heads, "chunks": [d]}, g.reshape(heads * d, r)).view(heads, d, r)
    whole = _update({"batch": 1, "chunks": [heads * d]}, g.reshape(heads * d, r)).view(heads, d, r)
    norms = split.flatten(1).norm(dim=1)
    assert norms.max() / norms.min() < 1.3
    for h in range(heads):
        s = torch.linalg.svdvals(split[h] / (0.2 * math.sqrt(max(d, r))))
        assert s.min() > 0.5 and s.max() < 1.5
    wn = whole.flatten(1).norm(dim=1)
    assert wn[0] / wn[1:].max() > 10  # without the split the big head dominates the update


def test_kv_b_split_k_and_v_separately():
    torch.manual_seed(0)
    heads, dn, dv, r = 2, 6, 10, 8
    g = torch.randn(heads * (dn + dv), r)
    u = _update({"batch": heads, "chunks": [dn, dv]}, g).view(heads, dn + dv, r)
    for h in range(heads):
        for block, rows in ((u[h, :dn], dn), (u[h, dn:], dv)):
            s = torch.linalg.svdvals(block / (0.2 * math.sqrt(max(rows, r))))
            assert s.min() > 0.5 and s.max() < 1.5


def _per_matrix_update(g, batch, chunks):
    """The update each layout promises, one matrix at a time: g viewed as [batch, R, C], rows cut into ``chunks``;
    each piece orthogonalised alone (the 2-D path, bit-identical to torch.optim.Muon, tested above) and scaled by
    Moonlight's 0.2·√max(rows, cols)."""
    v = g.reshape(batch, -1, g.shape[-1])
    out = []
    for b in range(batch):
        for m in v[b].split(chunks):
            out.append(zeropower_via_newtonschulz(m) * 0.2 * math.sqrt(max(m.shape)))
    return torch.cat(out).reshape(g.shape)


@pytest.mark.parametrize("shape, layout", [
    ((3, 2 * 10, 24), {"batch": 3, "chunks": [10, 10]}),  # experts.gate_up_proj: gate and up rows apart, per expert
    ((3, 24, 10), {"batch": 3, "chunks": [24]}),  # experts.down_proj: one matrix per expert
    ((4 * 12, 16), {"batch": 4, "chunks": [12]}),  # q_b_proj under Muon Split: per head
    ((2 * (6 + 20), 8), {"batch": 2, "chunks": [6, 20]}),  # kv_b_proj: K-up and V-up per head, different scales
])
def test_batched_layouts_equal_one_matrix_at_a_time(shape, layout):
    """Every matrix of a layout gets exactly the update it would get as a parameter of its own, scale included:
    orthogonalising gate and up rows together, or giving K-up and V-up one shared scale, changes the update."""
    torch.manual_seed(0)
    g = torch.randn(shape)
    expect = _per_matrix_update(g, layout["batch"], layout["chunks"])
    torch.testing.assert_close(_update(layout, g), expect, rtol=1e-4, atol=1e-5)


def test_param_groups_cover_the_model():
    cfg = preset("glm5-nano")
    model = GLM5ForCausalLM(cfg)
    opt = build_optimizers(model, kind="muon", muon_split=True, muon_impl="glm5")
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in seen
            seen[id(p)] = g["name"]
    assert set(seen) == set(names)
    by_name = {names[i]: grp for i, grp in seen.items()}
    assert by_name["model.embed_tokens.weight"] == "adamw_no_decay"
    assert by_name["lm_head.weight"] == "adamw_decay"
    assert by_name["model.norm.weight"] == "adamw_no_decay"
    assert by_name["model.layers.1.mlp.gate.weight"] == "adamw_decay"  # router
    assert by_name["model.layers.0.self_attn.indexer.k_norm.bias"] == "adamw_no_decay"
    h, dqk, dn, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    assert by_name["model.layers.0.self_attn.q_b_proj.weight"] == f"muon_b{h}_c{dqk}"
    assert by_name["model.layers.0.self_attn.kv_b_proj.weight"] == f"muon_b{h}_c{dn}-{dv}"
    I, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    assert by_name["model.layers.1.mlp.experts.gate_up_proj"] == f"muon_b{E}_c{I}-{I}"
    assert by_name["model.layers.1.mlp.experts.down_proj"] == f"muon_b{E}_c{cfg.hidden_size}"
    assert by_name["model.layers.0.mlp.gate_proj.weight"] == f"muon_b1_c{cfg.intermediate_size}"
    # without Muon Split the up-projections are plain matrices; AdamW-only takes everything
    plain = build_optimizers(model, kind="muon", muon_split=False, muon_impl="glm5")
    assert not any(g["name"] == f"muon_b{h}_c{dqk}" for g in plain.param_groups)
    adam = build_optimizers(model, kind="adamw")
    assert len(adam) == 1 and isinstance(adam.optimizers[0], torch.optim.AdamW)
    with pytest.raises(ValueError):
        muon_layout("x.weight", torch.zeros(3), cfg, True)


def test_muon_trains_a_model_step():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0)
    opt = build_optimizers(model, kind="muon", lr=1e-2, muon_impl="glm5")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 2048, (2, 32))
    out = model(x, dsa="dense")
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.1.mlp.experts.gate_up_proj" in changed and "lm_head.weight" in changed
    assert not any(".indexer." in n for n in changed)  # dense attention: the indexer gets no gradient


def test_schedules():
    total, warm = 100, 10
    cos = [lr_factor(s, total, warm, "cosine", 0.1) for s in range(total)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)
    assert cos[10] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    wsd = [lr_factor(s, total, warm, "wsd", 0.0, decay_fraction=0.2) for s in range(total)]
    assert all(v == 1.0 for v in wsd[10:80]) and wsd[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(wsd[82:], wsd[83:]))
    # a time budget: the position after warm-up is the fraction of the budget used
    assert lr_factor(50, 100, 10, "cosine", 0.0, progress=0.5) == pytest.approx(0.5)
    assert lr_factor(50, 100, 10, "wsd", 0.0, 0.2, progress=0.9) == pytest.approx(0.5)
    assert lr_factor(3, 100, 10, "cosine", progress=0.9) == pytest.approx(0.4)  # warm-up still counts steps
    assert [lr_factor(s, total, warm, "constant") for s in (10, 99)] == [1.0, 1.0]


def test_decays_end_at_min_ratio_and_stay_there():
    """Cosine and WSD both end at ``min_ratio`` × peak (not at 0) on the last step, WSD's linear decay passes the
    midpoint of [1, min_ratio] halfway through its window, and a time budget overrun (progress > 1) holds the
    floor instead of following the cosine back up or WSD's line below the floor."""
    total, warm, floor = 100, 10, 0.1
    for sched in ("cosine", "wsd"):
        assert lr_factor(total - 1, total, warm, sched, floor, 0.2) == pytest.approx(floor)
        for progress in (1.0, 1.25, 1.9):
            assert lr_factor(50, total, warm, sched, floor, 0.2, progress=progress) == pytest.approx(floor)
    assert lr_factor(50, total, warm, "wsd", floor, 0.2, progress=0.9) == pytest.approx((1 + floor) / 2)
    assert lr_factor(50, total, warm, "cosine", floor, progress=0.5) == pytest.approx((1 + floor) / 2)


def test_set_lr_scales_the_base_lr_not_the_current_one():
    """Each step sets lr = base_lr × factor from the group's fixed ``base_lr``: calling it every step must not
    compound the factors."""
    model = GLM5ForCausalLM(preset("glm5-nano"))
    opt = build_optimizers(model, kind="muon", lr=2e-3, muon_impl="glm5")
    for g in opt.param_groups:
        g["base_lr"] = 2e-3 if g["name"].startswith("adamw") else 1e-3
    for factor in (0.5, 0.5, 0.25):
        lr = set_lr(opt, factor)
        assert lr == pytest.approx(opt.param_groups[0]["base_lr"] * factor)
        assert all(g["lr"] == pytest.approx(g["base_lr"] * factor) for g in opt.param_groups)
