import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from glm5 import GLM5ForCausalLM, preset
from glm5.data.loader import IGNORE_INDEX, Batch
from glm5.model.moe import MoE
from glm5.train.balance import ExpertLoadTracker, load_stats, sequence_balance_loss, update_router_biases
from glm5.train.config import TrainConfig
from glm5.train.losses import LossConfig, compute_loss, count_targets, mtp_inputs, mtp_loss_sums
from moe_oracle import select_experts_by_hand  # tests/moe_oracle.py (tests/ is on sys.path)


def _nano(**kw):
    return GLM5ForCausalLM(preset("glm5-nano", **kw)).init_weights(0)


def test_bias_update_rule():
    model = _nano()
    idx = [i for i, _ in model.moe_layers()]
    E = model.config.n_routed_experts
    load = torch.arange(E, dtype=torch.float32)  # mean (E-1)/2: low half under-loaded
    loads = update_router_biases(model, {idx[0]: load}, rate=0.01)
    bias = dict(model.moe_layers())[idx[0]].gate.e_score_correction_bias
    mean = load.mean()
    assert torch.equal(bias, 0.01 * torch.sign(mean - load))
    assert bias.dtype == torch.float32 and torch.equal(loads[idx[0]], load)
    other = dict(model.moe_layers())[idx[1]].gate.e_score_correction_bias
    assert torch.equal(other, torch.zeros(E))  # layers without a recorded load are untouched


def test_bias_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    cfg = preset("glm5-nano")
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[0] += 0.5  # expert 0 would win for most tokens
        moe.experts.gate_up_proj.normal_(0, 0.02)
        moe.experts.down_proj.normal_(0, 0.02)
        moe.shared_experts.apply(lambda m: m.weight.normal_(0, 0.02) if hasattr(m, "weight") else None)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = moe

        def moe_layers(self):
            return [(0, self.m)]

    w = Wrap()
    tracker = ExpertLoadTracker(w)
    x = torch.randn(256, cfg.hidden_size) + 0.5 * torch.ones(cfg.hidden_size)
    vios = []
    for _ in range(100):
        with torch.no_grad():
            moe(x)
        loads = tracker.take_loads()
        vios.append(load_stats(loads)["max_vio"])
        update_router_biases(w, loads, rate=0.01)
    assert vios[0] > 2.0 and max(vios[-10:]) < 0.5 * vios[0]
    assert load_stats({0: torch.full((8,), 5.0)})["max_vio"] == 0.0


def test_tracker_counts_main_and_mtp_and_can_pause():
    model = _nano()
    tracker = ExpertLoadTracker(model)
    x = torch.randint(0, 2048, (2, 16))
    out = model(x, dsa="dense")
    k = model.config.num_experts_per_tok
    loads = tracker.take_loads()
    mtp_idx = model.config.num_hidden_layers
    assert set(loads) == {i for i, _ in model.moe_layers()} - {mtp_idx}
    assert all(float(v.sum()) == 32 * k for v in loads.values())
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    model.mtp_forward(out.hidden_states, x, torch.arange(16)[None].expand(2, 16), mask, dsa="dense")
    assert float(tracker.take_loads()[mtp_idx].sum()) == 32 * k
    tracker.active = False
    model(x, dsa="dense")
    assert tracker.take_loads() == {}


def test_sequence_balance_loss():
    cfg = preset("glm5-nano")
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    B, T = 2, 8
    uniform = torch.full((B * T, E), 0.5)
    # ties broken by topk: f sums to E/K·... ; with uniform scores P_i = 1/E, so loss = Σ f_i / E = 1
    assert float(sequence_balance_loss(uniform, (B, T), torch.zeros(E), cfg)) == pytest.approx(1.0)
    skew = torch.full((B * T, E), 0.1)
    skew[:, :K] = 0.9
    skew.requires_grad_(True)
    loss = sequence_balance_loss(skew, (B, T), torch.zeros(E), cfg)
    assert float(loss.detach()) > 1.5
    loss.backward()
    assert skew.grad[:, :K].sum() > 0  # raising the favoured experts' scores raises the loss


def _seq_balance_by_hand(scores, B, T, bias, K, n_group=1, topk_group=1):
    """DeepSeek-V3's sequence-wise balance loss (without α), one sequence at a time:
    L = mean_b Σ_i f_i·P_i, f_i = E/(K·T) · #{t : i chosen at t}, P_i = (1/T) Σ_t s_{t,i} / Σ_j s_{t,j}."""
    E = scores.shape[1]
    total = 0.0
    for b in range(B):
        rows = scores[b * T:(b + 1) * T]
        counts = [0] * E
        for row in rows.tolist():
            for e in select_experts_by_hand([r + b for r, b in zip(row, bias.tolist())], K, n_group, topk_group):
                counts[e] += 1
        P = (rows / rows.sum(-1, keepdim=True)).mean(0)
        total = total + sum(E / (K * T) * counts[i] * P[i] for i in range(E))
    return total / B


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2)])
def test_sequence_balance_loss_matches_the_formula(n_group, topk_group):
    """Value and gradient against the per-sequence formula, with a correction bias that changes the routing (the
    counts f_i follow the router's biased, group-limited choice) and sequences that route differently. The
    counts are constants: the gradient flows through P_i only."""
    B, T, E, K = 3, 5, 8, 2
    cfg = SimpleNamespace(num_experts_per_tok=K, n_group=n_group, topk_group=topk_group)
    g = torch.Generator().manual_seed(0)
    scores = torch.sigmoid(torch.randn(B * T, E, generator=g) * 2).requires_grad_(True)
    bias = torch.randn(E, generator=g) * 0.5
    loss = sequence_balance_loss(scores, (B, T), bias, cfg)
    ref = _seq_balance_by_hand(scores, B, T, bias, K, n_group, topk_group)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    # the case is only telling if the bias and the groups change the loss
    with torch.no_grad():
        assert float(ref) != pytest.approx(float(_seq_balance_by_hand(scores, B, T, torch.zeros(E), K, n_group,
                                                                      topk_group)), rel=1e-3)
        if n_group > 1:
            assert float(ref) != pytest.approx(float(_seq_balance_by_hand(scores, B, T, bias, K)), rel=1e-3)
    (g_src,) = torch.autograd.grad(loss, scores)
    (g_ref,) = torch.autograd.grad(ref, scores)
    torch.testing.assert_close(g_src, g_ref)


def test_sequence_balance_loss_reaches_the_router_weights():
    """The router scores the MoE block records for the balance loss keep their graph: the loss alone gives the
    router weight a gradient (it is what the loss trains)."""
    model = _nano()
    tracker = ExpertLoadTracker(model)
    tracker.record_scores = True
    model(torch.randint(0, 2048, (2, 8)), dsa="dense")
    idx, scores, shape = tracker.take_scores()[0]
    moe = dict(model.moe_layers())[idx]
    loss = sequence_balance_loss(scores, shape, moe.gate.e_score_correction_bias, model.config)
    (grad,) = torch.autograd.grad(loss, moe.gate.weight)
    assert grad.abs().sum() > 0


def test_load_stats_by_hand():
    """max_vio = (max − mean)/mean and cv = population std / mean per layer, then averaged over layers."""
    stats = load_stats({3: torch.tensor([1.0, 2.0, 3.0, 6.0]), 5: torch.full((4,), 4.0)})
    cv3 = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4) / 3
    assert stats["layers"] == {"3": 1.0, "5": 0.0}
    assert stats["max_vio"] == pytest.approx((1.0 + 0.0) / 2) and stats["cv"] == pytest.approx(cv3 / 2)
    assert load_stats({}) == {}


def test_tracker_sums_loads_over_forwards():
    """A step's loads are the sum over its micro-batches: every forward adds to what the tracker holds until
    ``take_loads`` empties it."""
    model = _nano()
    tracker = ExpertLoadTracker(model)
    seen = {}
    for B, S in ((2, 16), (1, 8)):
        model(torch.randint(0, 2048, (B, S)), dsa="dense")
        for i, moe in model.moe_layers()[:-1]:  # the MTP layer did not run
            seen[i] = seen.get(i, 0) + moe.last_expert_load
    loads = tracker.take_loads()
    assert loads.keys() == seen.keys()
    k = model.config.num_experts_per_tok
    for i in seen:
        assert torch.equal(loads[i], seen[i].float()) and float(loads[i].sum()) == (2 * 16 + 1 * 8) * k
    assert tracker.take_loads() == {}


def _batch(B=2, S=16, vocab=2048, seed=0, doc_break=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(1, vocab, (B, S + 1), generator=g)
    pos = torch.arange(S).expand(B, S).clone()
    mask = None
    if doc_break is not None:
        pos[:, doc_break:] = torch.arange(S - doc_break)
        doc = (torch.arange(S) >= doc_break).long()
        mask = ((doc[:, None] == doc[None, :]) & torch.ones(S, S, dtype=torch.bool).tril())[None, None].expand(B, 1, S, S)
    return Batch(w[:, :-1], w[:, 1:].clone(), pos, mask)


def test_mtp_targets_shift_and_respect_documents():
    b = _batch(B=1, S=10, doc_break=6)
    nxt, lab = mtp_inputs(b, 2, pad_id=0)
    ids, labels = b.input_ids[0], b.labels[0]
    assert nxt[0, :8].tolist() == ids[2:].tolist() and nxt[0, 8:].tolist() == [0, 0]
    # position t predicts labels[t+2] = x_{t+3}; positions 4,5 would cross into the next document
    expect = [labels[t + 2].item() if t + 2 < 10 and (t + 2 < 6 or t >= 6) else IGNORE_INDEX for t in range(10)]
    assert lab[0].tolist() == expect
    assert count_targets(b, 2).tolist() == [10.0, 8.0, 6.0]


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), d=st.integers(1, 4))
@example(lengths=[2, 5], d=3)  # t=1 → t+3=4: position 1 → 2, increasing, yet in the next document
def test_mtp_inputs_never_cross_a_document(lengths, d):
    """Packed documents of any lengths, also ones no longer than d (across whose boundary the position ids need
    not decrease): step d at t sees x_{t+d} and targets labels[t+d] only while t+d is in the row and in t's
    document."""
    S = sum(lengths)
    doc = [i for i, n in enumerate(lengths) for _ in range(n)]
    pos = torch.tensor([[t for n in lengths for t in range(n)]])
    ids, labels = torch.arange(100, 100 + S)[None], torch.arange(200, 200 + S)[None]
    nxt, lab = mtp_inputs(Batch(ids, labels, pos, None), d, pad_id=0)
    for t in range(S):
        inside = t + d < S
        assert nxt[0, t] == (ids[0, t + d] if inside else 0)
        assert lab[0, t] == (labels[0, t + d] if inside and doc[t + d] == doc[t] else IGNORE_INDEX), t


def test_default_mtp_weight_is_0_3():
    """λ_mtp defaults to 0.3 (GLM-4.5's MTP scaling, training-and-environment.md §A3) in both configs."""
    assert LossConfig().mtp_weight == 0.3 and TrainConfig().mtp_weight == 0.3


def test_loss_is_ce_plus_weighted_mtp():
    torch.manual_seed(0)
    model = _nano()
    b = _batch()
    lc = LossConfig(stage="dense", mtp_depth=2, mtp_weight=0.3)
    norm = count_targets(b, 2).tolist()
    loss, st = compute_loss(model, b, lc, norm)
    out = model(b.input_ids, position_ids=b.position_ids, dsa="dense")
    ce = F.cross_entropy(out.logits.flatten(0, 1), b.labels.flatten())
    assert st["ce_sum"] / norm[0] == pytest.approx(float(ce.detach()), rel=1e-5)
    mtp = sum(s / n for s, n in zip(st["mtp_sums"], norm[1:])) / 2
    assert float(loss.detach()) == pytest.approx(float(ce.detach()) + 0.3 * mtp, rel=1e-5)
    lc0 = LossConfig(stage="dense", mtp_depth=0)
    loss0, st0 = compute_loss(model, b, lc0, count_targets(b, 0).tolist())
    assert float(loss0.detach()) == pytest.approx(float(ce.detach()), rel=1e-5) and st0["mtp_sums"] == []


def test_loss_terms_weights_grad_scale_and_micro_batches():
    """How the terms combine (module docstring of glm5.train.losses): token losses are normalised by the global
    target counts and multiplied by grad_scale; the per-batch means (balance, indexer KL) are weighted by α and
    w_idx and divided by the number of micro-batches. The indexer warm-up's loss is the KL alone."""
    torch.manual_seed(0)
    model = _nano(index_topk=4)
    with torch.no_grad():  # sharpen the indexers: at init they agree with attention so well that the KL is ~1e-4
        for n, p in model.named_parameters():
            if n.endswith("indexer.weights_proj.weight"):
                p.mul_(30.0)
    tracker = ExpertLoadTracker(model)
    b = _batch(S=16)
    norm = count_targets(b, 2).tolist()
    lc = LossConfig(stage="sparse", mtp_depth=2, mtp_weight=0.3, seq_balance_alpha=0.01, indexer_loss_weight=0.5)
    loss, st = compute_loss(model, b, lc, norm, grad_scale=2.0, n_micro=3, tracker=tracker)
    assert st["balance"] > 0.5 and st["indexer_kl"] > 1e-2  # both terms are large enough to be seen below
    mtp = sum(s / n for s, n in zip(st["mtp_sums"], norm[1:])) / 2
    expect = (st["ce_sum"] / norm[0] + 0.3 * mtp) * 2.0 + (0.01 * st["balance"] + 0.5 * st["indexer_kl"]) / 3
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-6)
    warm, st_w = compute_loss(model, b, LossConfig(stage="indexer-warmup"), norm, grad_scale=2.0, n_micro=3)
    assert float(warm.detach()) == pytest.approx(st_w["indexer_kl"] / 3, rel=1e-6)


@torch.no_grad()
def test_mtp_steps_chain_and_self_distil_from_the_main_model():
    """Step d feeds on step d−1's hidden state (step 1 on the main model's) and x_{t+d}. With ``target="data"``
    its sum is the CE against labels[t+d]; with ``target="self"`` the KL(main model's distribution at t+d ‖ MTP's
    at t), the main model predicting the same token x_{t+d+1}, over the same positions."""
    torch.manual_seed(0)
    model = _nano()
    b = _batch(B=2, S=12, doc_break=7)
    out = model(b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask, dsa="dense")
    data = mtp_loss_sums(model, b, out.hidden_states, 3, "dense")
    self_kl = mtp_loss_sums(model, b, out.hidden_states, 3, "dense", target="self")
    h = out.hidden_states
    for d in range(1, 4):
        nxt, lab = mtp_inputs(b, d)
        logits, h = model.mtp_forward(h, nxt, b.position_ids, b.attention_mask, dsa="dense")
        ce = F.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        assert float(data[d - 1]) == pytest.approx(float(ce), rel=1e-5), d
        valid = lab[:, :-d] != IGNORE_INDEX
        log_p = out.logits[:, d:][valid].log_softmax(-1)  # the main model at t+d
        log_q = logits[:, :-d][valid].log_softmax(-1)  # MTP step d at t
        kl = (log_p.exp() * (log_p - log_q)).sum()
        assert float(self_kl[d - 1]) == pytest.approx(float(kl), rel=1e-4), d


def test_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    lc = LossConfig(stage="dense", mtp_depth=1, mtp_weight=0.3)
    big = _batch(B=4, seed=1)
    halves = [Batch(big.input_ids[i:i + 2], big.labels[i:i + 2], big.position_ids[i:i + 2], None) for i in (0, 2)]
    halves[1].labels[0, :5] = IGNORE_INDEX  # unequal target counts across micro-batches
    big.labels[2, :5] = IGNORE_INDEX

    def grads(batches):
        model = _nano()
        norm = sum(count_targets(b, 1) for b in batches).tolist()
        for b in batches:
            compute_loss(model, b, lc, norm, n_micro=len(batches))[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g1, g2 = grads([big]), grads(halves)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-4), n


def test_sparse_stage_separates_indexer_and_lm_gradients():
    torch.manual_seed(0)
    model = _nano(index_topk=4)
    b = _batch(S=16)
    norm = count_targets(b, 1).tolist()
    loss, st = compute_loss(model, b, LossConfig(stage="sparse", indexer_loss_weight=0.0), norm)
    loss.backward()
    idx_grads = [p.grad for n, p in model.named_parameters() if ".indexer." in n]
    assert all(g is None for g in idx_grads)  # top-k is not differentiable: LM loss never reaches the indexer
    model.zero_grad()
    _, st = compute_loss(model, b, LossConfig(stage="sparse"), norm)
    assert st["indexer_kl"] is not None and st["indexer_kl"] > 0
    # KL alone: only indexer parameters receive gradient (their inputs are detached)
    model.zero_grad()
    out = model(b.input_ids, dsa="sparse", indexer_loss="sparse")
    torch.stack(out.aux_losses).mean().backward()
    for n, p in model.named_parameters():
        has = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has == (".indexer." in n and not n.startswith(f"model.layers.{model.config.num_hidden_layers}.")), n


@torch.no_grad()
def test_mtp_agreement_aligns_step_d_with_the_main_prediction_d_positions_later():
    """Main logits built so that the main model's top-1 at t+1 is exactly MTP step 1's top-1 at t: step 1 then
    agrees at every counted position, and the same logits one position off agree far less. Positions across a
    document boundary are not counted."""
    from glm5.train.losses import mtp_agreement

    model = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0).eval()
    b = _batch(B=2, S=16, doc_break=9)
    out = model(b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask)
    nxt, lab = mtp_inputs(b, 1)
    step1, _ = model.mtp_forward(out.hidden_states, nxt, b.position_ids, b.attention_mask)
    top = step1.argmax(-1)  # [B,S]: step 1's guess for x_{t+2}
    V = step1.shape[-1]
    aligned = torch.zeros(2, 16, V)
    aligned[:, 1:] = F.one_hot(top[:, :-1], V).float()  # main top-1 at t+1 := step 1's top-1 at t
    off = torch.zeros(2, 16, V)
    off[:, :] = F.one_hot(top, V).float()  # main top-1 at t := step 1's top-1 at t (one position off)
    m_al, ch_al, n = mtp_agreement(model, b, out.hidden_states, aligned, 2, "sparse")
    m_off, _, n_off = mtp_agreement(model, b, out.hidden_states, off, 2, "sparse")
    assert n == n_off == int((lab != IGNORE_INDEX).sum()) == 2 * (16 - 2)  # 2 positions lost per row at the break
    assert m_al[0] == ch_al[0] == n
    assert m_off[0] < n // 2
    assert ch_al[1] <= m_al[1] and ch_al[1] <= ch_al[0]  # a chain survives step 2 only if step 1 matched
