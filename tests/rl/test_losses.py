"""Policy-loss formulas against hand computation, clip-higher asymmetry, GSPO, DDIS/IS masks, TIS, KL, entropy,
aggregation, micro-batch denominators and the advantage estimators."""

import math

import pytest
import torch

from glm5.rl.losses import LossConfig, compute_advantages, kl_penalty, policy_loss, token_logprobs_and_entropy


def leaf(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ------------------------------------------------------------------------------------------- PPO
def test_ppo_clip_higher_matches_hand_computation():
    ratios = [1.1, 1.35, 0.7, 0.9]
    adv = [1.0, 1.0, -2.0, -2.0]
    old = [-1.0, -2.0, -0.5, -3.0]
    logp = leaf([[o + math.log(r) for o, r in zip(old, ratios)]])
    a = t([adv])
    mask = t([[1, 1, 1, 1]])
    loss, m = policy_loss(logp, t([old]), a, mask, cfg=LossConfig(eps_low=0.2, eps_high=0.28))
    hand = []
    for r, A in zip(ratios, adv):
        hand.append(max(-r * A, -min(max(r, 0.8), 1.28) * A))
    assert loss.item() == pytest.approx(sum(hand) / 4, rel=1e-9)
    # token 1 (r=1.35 > 1.28, A>0) and token 2 (r=0.7 < 0.8, A<0) are clipped
    assert m["clipfrac"] == pytest.approx(0.5)
    assert m["clipfrac_high"] == pytest.approx(0.25) and m["clipfrac_low"] == pytest.approx(0.25)
    g = grad_of(loss, logp)[0]
    # d/dlogp of −rA/4 is −rA/4 on unclipped tokens, 0 on clipped ones
    assert g[0].item() == pytest.approx(-1.1 * 1.0 / 4)
    assert g[1].item() == 0.0 and g[2].item() == 0.0
    assert g[3].item() == pytest.approx(-0.9 * -2.0 / 4)


def test_clip_higher_is_asymmetric():
    """ε_high = 0.28 lets a positive-advantage token grow to 1.28 (not just 1.2); ε_low stays 0.2."""
    cfg = LossConfig(eps_low=0.2, eps_high=0.28)

    def grad_at(r, A):
        logp = leaf([[math.log(r)]])
        loss, _ = policy_loss(logp, t([[0.0]]), t([A]), t([[1.0]]), cfg=cfg)
        return grad_of(loss, logp).item()

    assert grad_at(1.25, 1.0) != 0.0  # inside (1.2, 1.28]: still learning (symmetric 0.2 would clip it)
    assert grad_at(1.29, 1.0) == 0.0  # past 1 + ε_high: clipped
    assert grad_at(0.81, -1.0) != 0.0
    assert grad_at(0.79, -1.0) == 0.0  # below 1 − ε_low with A < 0: clipped
    assert grad_at(0.75, 1.0) != 0.0  # the pessimistic max never clips a token the ratio moved "against" A
    sym = LossConfig(eps_low=0.2, eps_high=0.2)
    logp = leaf([[math.log(1.25)]])
    loss, _ = policy_loss(logp, t([[0.0]]), t([1.0]), t([[1.0]]), cfg=sym)
    assert grad_of(loss, logp).item() == 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    logp = leaf([[math.log(5.0)]])
    loss, m = policy_loss(logp, t([[0.0]]), t([-1.0]), t([[1.0]]), cfg=LossConfig(dual_clip=3.0))
    assert loss.item() == pytest.approx(3.0)  # min(max(5, 1.28)·1, 3·1)
    assert grad_of(loss, logp).item() == 0.0
    assert m["dual_clipfrac"] == 1.0


def test_on_policy_first_step_ratio_one_and_kl_zero():
    logp = leaf([[-1.0, -2.0, -0.3], [-0.5, -0.1, -4.0]])
    loss, m = policy_loss(logp, logp.detach(), t([1.0, -1.0]), t([[1, 1, 1], [1, 1, 0]]),
                          rollout_logp=logp.detach())
    assert m["ratio_mean"] == 1.0 and m["ppo_kl"] == 0.0 and m["clipfrac"] == 0.0
    assert m["train_rollout_logprob_abs_diff"] == 0.0 and m["rollout_ratio_mean"] == 1.0


# ------------------------------------------------------------------------------------------- GSPO
def test_gspo_sequence_ratio():
    old = t([[-1.0, -1.0, -1.0, 0.0], [-2.0, -2.0, 0.0, 0.0]])
    delta = [[0.1, -0.05, 0.25, 9.0], [0.02, 0.04, 7.0, 7.0]]  # masked positions carry junk
    logp = leaf((old + t(delta)).tolist())
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    A = t([1.0, 1.0])
    cfg = LossConfig(loss_type="gspo", eps_low=0.5, eps_high=0.5, agg="seq")
    loss, m = policy_loss(logp, old, A, mask, cfg=cfg)
    s1 = math.exp((0.1 - 0.05 + 0.25) / 3)
    s2 = math.exp((0.02 + 0.04) / 2)
    assert loss.item() == pytest.approx(-(s1 + s2) / 2, rel=1e-9)
    g = grad_of(loss, logp)
    # ∂/∂logp_t of −s_i/2 = −s_i/(2|y_i|) for every unmasked token of sequence i, 0 on masked ones
    for j in range(3):
        assert g[0, j].item() == pytest.approx(-s1 / 6)
    for j in range(2):
        assert g[1, j].item() == pytest.approx(-s2 / 4)
    assert g[0, 3].item() == 0.0 and g[1, 2].item() == 0.0


def test_gspo_clips_whole_sequence():
    old = t([[0.0, 0.0]])
    logp = leaf([[0.3, -0.1]])  # sequence ratio exp(0.1) = 1.105 > 1 + 4e-4
    loss, m = policy_loss(logp, old, t([1.0]), t([[1, 1]]), cfg=LossConfig(loss_type="gspo", eps_low=3e-4,
                                                                            eps_high=4e-4))
    assert loss.item() == pytest.approx(-(1 + 4e-4))
    assert torch.all(grad_of(loss, logp) == 0)
    assert m["clipfrac"] == 1.0


# ------------------------------------------------------------------------------------ DDIS / IS mask
def test_ddis_masks_exactly_out_of_band_tokens():
    rollout = t([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    ratios = [1.0, 0.75, 1.27, 1.30, 0.85]  # band [0.8, 1.28]: tokens 1 and 3 are out
    logp = leaf([[-1.0 + math.log(r) for r in ratios]])
    A = t([2.0])
    mask = t([[1, 1, 1, 1, 1]])
    loss, m = policy_loss(logp, t([[0.0] * 5]), A, mask, rollout_logp=rollout, cfg=LossConfig(loss_type="ddis"))
    inband = [0, 2, 4]
    assert loss.item() == pytest.approx(-2.0 * sum(ratios[i] for i in inband) / 5)  # denominator keeps all 5
    g = grad_of(loss, logp)[0]
    for i in range(5):
        if i in inband:
            assert g[i].item() == pytest.approx(-2.0 * ratios[i] / 5)  # −Â·r·∇log π
        else:
            assert g[i].item() == 0.0
    assert m["is_masked_frac"] == pytest.approx(2 / 5)


def test_is_mask_with_ppo_uses_rollout_ratio():
    """GLM-5 mask on π_θ/π_rollout combined with PPO on π_θ/π_old: out-of-band tokens contribute nothing."""
    old = t([[-1.0, -1.0, -1.0]])
    logp = leaf([[-1.0, -1.0, -1.0]])  # ratio to old = 1 everywhere
    rollout = t([[-1.0, -1.0 + math.log(2.0), -1.0 - math.log(1.1)]])  # π_θ/μ = 1, 0.5, 1.1
    loss, m = policy_loss(logp, old, t([1.0]), t([[1, 1, 1]]), rollout_logp=rollout, cfg=LossConfig(is_mask=True))
    g = grad_of(loss, logp)[0]
    assert g[0].item() == pytest.approx(-1 / 3) and g[2].item() == pytest.approx(-1 / 3)
    assert g[1].item() == 0.0
    assert loss.item() == pytest.approx(-2 / 3)
    with pytest.raises(ValueError):
        policy_loss(logp, old, t([1.0]), t([[1, 1, 1]]), cfg=LossConfig(is_mask=True))


def test_tis_and_icepop_weights():
    old = t([[0.0, 0.0, 0.0]])
    logp = leaf([[0.0, 0.0, 0.0]])
    rollout = t([[math.log(2.0), -math.log(3.0), 0.0]])  # ρ = π_old/μ = 0.5, 3, 1
    A = t([1.0])
    mask = t([[1, 1, 1]])
    loss, m = policy_loss(logp, old, A, mask, rollout_logp=rollout, cfg=LossConfig(tis="tis", tis_clip=2.0))
    # per token −ρ·w·A with ratio 1: w = 0.5, 2 (clipped from 3), 1
    assert loss.item() == pytest.approx(-(0.5 + 2.0 + 1.0) / 3)
    loss, m = policy_loss(logp, old, A, mask, rollout_logp=rollout, cfg=LossConfig(tis="icepop", tis_clip=2.0))
    assert loss.item() == pytest.approx(-(0.5 + 0.0 + 1.0) / 3)  # 3 > β = 2: popped
    assert m["tis_clipfrac"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------ KL, entropy, agg
def test_kl_estimators():
    lp, ref = t([-1.0]), t([-1.5])
    u = -0.5
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(-u)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * u * u)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(math.exp(u) - u - 1)
    logp = leaf([[-1.0, -2.0]])
    ref = t([[-1.5, -2.0]])
    base, _ = policy_loss(logp, logp.detach(), t([0.0]), t([[1, 1]]), cfg=LossConfig())
    loss, m = policy_loss(logp, logp.detach(), t([0.0]), t([[1, 1]]), ref_logp=ref, cfg=LossConfig(kl_coef=0.1))
    k3 = (math.exp(-0.5) + 0.5 - 1 + 0.0) / 2
    assert m["kl"] == pytest.approx(k3)
    assert loss.item() == pytest.approx(base.item() + 0.1 * k3)


def test_entropy_bonus_and_exact_entropy():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([[0, 2]]))
    p = torch.softmax(logits, -1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1))
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[0, [0, 1], [0, 2]][None])
    logp = leaf([[-1.0, -1.0]])
    loss, m = policy_loss(logp, logp.detach(), t([0.0]), t([[1, 1]]), entropy=ent,
                          cfg=LossConfig(entropy_coef=0.01))
    assert loss.item() == pytest.approx(-0.01 * ent.mean().item())
    assert m["entropy"] == pytest.approx(ent.mean().item())


def test_token_vs_sequence_aggregation():
    logp = leaf([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    A = t([1.0, 3.0])
    tok, _ = policy_loss(logp, logp.detach(), A, mask, cfg=LossConfig(agg="token"))
    seq, _ = policy_loss(logp, logp.detach(), A, mask, cfg=LossConfig(agg="seq"))
    assert tok.item() == pytest.approx(-(1 + 1 + 1 + 3) / 4)
    assert seq.item() == pytest.approx(-(1.0 + 3.0) / 2)


@pytest.mark.parametrize("agg", ["token", "seq"])
def test_micro_batches_sum_to_full_batch(agg):
    torch.manual_seed(0)
    lp = torch.randn(6, 5, dtype=torch.float64) * 0.1 - 1
    old = lp + torch.randn(6, 5, dtype=torch.float64) * 0.05
    mask = (torch.rand(6, 5) > 0.3).double()
    mask[:, 0] = 1
    A = torch.randn(6, dtype=torch.float64)
    cfg = LossConfig(agg=agg)
    full, _ = policy_loss(lp, old, A, mask, cfg=cfg)
    parts = sum(policy_loss(lp[i:i + 2], old[i:i + 2], A[i:i + 2], mask[i:i + 2], cfg=cfg,
                            num_tokens=float(mask.sum()), num_seqs=6)[0] for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(full.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------- advantages
def test_advantage_estimators():
    r = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 2.0]
    g = [0, 0, 0, 0, 1, 1, 2]
    a = compute_advantages(r, g, "grpo")
    m, sd = 0.5, math.sqrt(sum((x - 0.5) ** 2 for x in r[:4]) / 3)  # unbiased std
    assert a[:4].tolist() == pytest.approx([(x - m) / (sd + 1e-6) for x in r[:4]], rel=1e-6)
    assert a[4:].tolist() == [0.0, 0.0, 0.0]  # zero variance, and a group of one
    assert compute_advantages(r, g, "mean")[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    rl = compute_advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], "rloo").tolist()
    assert rl == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert compute_advantages(r, g, "none").tolist() == pytest.approx(r)
    with pytest.raises(ValueError):
        compute_advantages(r, g, "gae")


def test_config_validation():
    with pytest.raises(ValueError):
        LossConfig(loss_type="dpo")
    with pytest.raises(ValueError):
        LossConfig(agg="batch")
    with pytest.raises(ValueError):
        LossConfig(dual_clip=0.5)
