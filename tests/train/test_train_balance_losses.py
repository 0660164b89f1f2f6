import pytest
import torch
import torch.nn.functional as F

from glm5 import GLM5ForCausalLM, preset
from glm5.data.loader import IGNORE_INDEX, Batch
from glm5.model.moe import MoE
from glm5.train.balance import ExpertLoadTracker, load_stats, sequence_balance_loss, update_router_biases
from glm5.train.losses import LossConfig, compute_loss, count_targets, mtp_inputs


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
