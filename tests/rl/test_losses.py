"""Policy-loss formulas against hand computation, clip-higher asymmetry, GSPO, DDIS/IS masks, TIS, KL, entropy,
aggregation, micro-batch denominators and the advantage estimators."""

import math

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from([-1.0, 0.0, 1.0, 0.5, 2.0, 1e-7]), st.integers(0, 3)), min_size=1,
                max_size=12))
def test_advantages_are_normalised_within_each_group_only(samples):
    """For any rewards and group layout: GRPO Â_i = (r_i − mean_g)/(unbiased std_g + 1e-6) (0 for a group of one),
    mean-centring subtracts the group mean, RLOO the mean of the *other* members; other groups never matter."""
    rewards, groups = [r for r, _ in samples], [g for _, g in samples]
    got = {est: compute_advantages(rewards, groups, est).tolist() for est in ("grpo", "mean", "rloo")}
    for k, (r, g) in enumerate(samples):
        mates = [x for x, h in samples if h == g]
        mean = statistics.fmean(mates)
        sd = statistics.stdev(mates) if len(mates) > 1 else 0.0
        assert got["grpo"][k] == pytest.approx((r - mean) / (sd + 1e-6), rel=1e-5, abs=1e-6)
        assert got["mean"][k] == pytest.approx(r - mean, abs=1e-6)
        others = len(mates) - 1
        assert got["rloo"][k] == pytest.approx(r - (sum(mates) - r) / others if others else 0.0, abs=1e-6)


def test_config_validation():
    with pytest.raises(ValueError):
        LossConfig(loss_type="dpo")
    with pytest.raises(ValueError):
        LossConfig(agg="batch")
    with pytest.raises(ValueError):
        LossConfig(dual_clip=0.5)


# ------------------------------------------------------------------ every switch against an independent reference
# A plain-Python transcription of the formulas in shared/reference/async-rl.md §2 and GLM-5 §4.1.2 (floats and the
# math module only, no torch), so a wrong sign, bound, log-prob source, mask or denominator in policy_loss shows up
# as a value, gradient or metric mismatch. Stop-gradients (CISPO's sg(clip(ρ)), the DDIS / IS band masks, the TIS
# weights) are evaluated at ``frozen`` when given: a finite difference of ``_ref_loss`` with ``frozen`` held at the
# base point is then exactly the gradient the surrogate must have.
def _agg(x, mask, agg):
    if agg == "token":
        return sum(xv * mv for xr, mr in zip(x, mask) for xv, mv in zip(xr, mr)) / max(sum(map(sum, mask)), 1.0)
    per_seq = [sum(xv * mv for xv, mv in zip(xr, mr)) / max(sum(mr), 1.0) for xr, mr in zip(x, mask)]
    return sum(per_seq) / len(per_seq)  # an all-masked sequence adds 0 but still counts in B


def _ref_loss(cfg, lp, old, mu, ref, ent, adv, mask, frozen=None):
    """(loss, metrics) per the reference formulas; ``adv`` is per token [B][T]."""
    frozen = lp if frozen is None else frozen
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    B, T = len(lp), len(lp[0])
    per_tok = [[0.0] * T for _ in range(B)]
    clip_l, clip_h, clipped, masked, tis_out = ([[0.0] * T for _ in range(B)] for _ in range(5))
    for i in range(B):
        n_i = max(sum(mask[i]), 1.0)
        s_i = math.exp(sum(mask[i][t] * (lp[i][t] - old[i][t]) for t in range(T)) / n_i)  # GSPO sequence ratio
        for t in range(T):
            A = adv[i][t]
            rho = math.exp(lp[i][t] - old[i][t])
            if cfg.loss_type in ("ppo", "gspo"):
                r = s_i if cfg.loss_type == "gspo" else rho
                unclipped, clip_term = -r * A, -min(max(r, lo), hi) * A
                L = max(unclipped, clip_term)
                clipped[i][t] = float(clip_term > unclipped)
                clip_l[i][t] = float(clip_term > unclipped and r < lo)
                clip_h[i][t] = float(clip_term > unclipped and r > hi)
                if cfg.dual_clip is not None and A < 0:
                    L = min(L, -cfg.dual_clip * A)
            elif cfg.loss_type == "cispo":
                rho_sg = math.exp(frozen[i][t] - old[i][t])
                L = -min(max(rho_sg, lo), hi) * A * lp[i][t]
                clipped[i][t] = float(rho_sg < lo or rho_sg > hi)
            elif cfg.loss_type == "ddis":
                r_sg = math.exp(frozen[i][t] - mu[i][t])
                L = -math.exp(lp[i][t] - mu[i][t]) * A * (1.0 if lo < r_sg < hi else 0.0)  # f(r) = r inside, open band
            else:  # reinforce
                L = -A * lp[i][t]
            w = 1.0
            if cfg.tis is not None:
                rho_mis = math.exp(old[i][t] - mu[i][t])  # π_old / μ
                if cfg.tis == "tis":
                    c_low = cfg.tis_clip_low or 0.0
                    w = min(max(rho_mis, c_low), cfg.tis_clip)
                else:
                    c_low = 1 / cfg.tis_clip if cfg.tis_clip_low is None else cfg.tis_clip_low
                    w = rho_mis if c_low <= rho_mis <= cfg.tis_clip else 0.0
                tis_out[i][t] = float(not c_low <= rho_mis <= cfg.tis_clip)
            if cfg.loss_type == "ddis" or cfg.is_mask:
                band = (lo, hi) if cfg.loss_type == "ddis" else (1 - cfg.is_eps_low, 1 + cfg.is_eps_high)
                inside = band[0] < math.exp(frozen[i][t] - mu[i][t]) < band[1]
                masked[i][t] = float(not inside)
                if cfg.loss_type != "ddis":
                    w *= float(inside)
            per_tok[i][t] = w * L
    kl_of = {"k1": lambda u: -u, "k2": lambda u: u * u / 2, "k3": lambda u: math.exp(u) - u - 1}[cfg.kl_type]
    kl = [[kl_of(ref[i][t] - lp[i][t]) for t in range(T)] for i in range(B)]
    pg, kl_mean, ent_mean = _agg(per_tok, mask, cfg.agg), _agg(kl, mask, cfg.agg), _agg(ent, mask, cfg.agg)
    tok_mean = lambda x: _agg(x, mask, "token")  # noqa: E731  (metrics are token means whatever the aggregation)
    metrics = {"pg_loss": pg, "kl": kl_mean, "entropy": ent_mean, "clipfrac": tok_mean(clipped),
               "ppo_kl": tok_mean([[o - n for o, n in zip(orow, nrow)] for orow, nrow in zip(old, lp)]),
               "ratio_mean": tok_mean([[math.exp(n - o) for o, n in zip(orow, nrow)] for orow, nrow in zip(old, lp)]),
               "train_rollout_logprob_abs_diff": tok_mean([[abs(n - r) for r, n in zip(rr, nr)]
                                                           for rr, nr in zip(mu, lp)])}
    if cfg.loss_type in ("ppo", "gspo"):
        metrics |= {"clipfrac_low": tok_mean(clip_l), "clipfrac_high": tok_mean(clip_h)}
    if cfg.loss_type == "ddis" or cfg.is_mask:
        metrics["is_masked_frac"] = tok_mean(masked)
    if cfg.tis is not None:
        metrics["tis_clipfrac"] = tok_mean(tis_out)
    return pg + cfg.kl_coef * kl_mean - cfg.entropy_coef * ent_mean, metrics


REFERENCE_CASES = [
    LossConfig(),
    LossConfig(eps_low=0.1, eps_high=0.3, agg="seq"),
    LossConfig(dual_clip=1.2),
    LossConfig(loss_type="gspo", eps_low=0.02, eps_high=0.05),
    LossConfig(loss_type="gspo", eps_low=0.5, eps_high=0.5, agg="seq"),
    LossConfig(loss_type="cispo", eps_low=0.1, eps_high=0.15),
    LossConfig(loss_type="cispo", agg="seq"),
    LossConfig(loss_type="ddis", eps_low=0.25, eps_high=0.2, is_eps_low=0.6, is_eps_high=0.9),  # ddis ignores is_eps
    LossConfig(loss_type="reinforce", kl_coef=0.3, kl_type="k1"),
    LossConfig(tis="tis", tis_clip=1.1),
    LossConfig(tis="tis", tis_clip=1.2, tis_clip_low=0.9, agg="seq"),
    LossConfig(tis="icepop", tis_clip=1.2),
    LossConfig(tis="icepop", tis_clip=1.3, tis_clip_low=0.95),
    LossConfig(is_mask=True),  # the default band (0.8, 1.28)
    LossConfig(is_mask=True, eps_low=0.5, eps_high=0.5, is_eps_low=0.1, is_eps_high=0.15, agg="seq"),
    LossConfig(kl_coef=0.5, kl_type="k1", entropy_coef=0.05),
    LossConfig(kl_coef=0.5, kl_type="k2", entropy_coef=0.05, agg="seq"),
    LossConfig(kl_coef=0.5, kl_type="k3", entropy_coef=0.05),
    LossConfig(kl_type="k2"),  # no KL in the loss, but the logged KL must still be the k2 estimate
]


# batch seeds (per-sequence / per-token advantages) picked so that the guard test below holds for both
REFERENCE_SEEDS = {False: 5, True: 2}


def _random_batch(seed, per_token_adv):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 5
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.5 - 0.1
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.25
    mu = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.25
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0] = 1.0
    mask[1, 0] = 1.0
    mask[3] = 0.0  # a sequence with no trainable token (e.g. all tool output): must add 0, not NaN
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv else torch.randn(B, generator=g,
                                                                                              dtype=torch.float64)
    return lp, old, mu, ref, ent, mask, adv


@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("cfg", REFERENCE_CASES, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.to_dict().items() if v != LossConfig().to_dict()[k]) or "default")
def test_policy_loss_value_gradients_and_metrics_match_the_reference_formulas(cfg, per_token_adv):
    """Random off-policy batches (ratios spread around the clip / mask / TIS bounds, one fully masked sequence):
    the loss, its gradient w.r.t. log π_θ and the entropy, and every logged metric equal the reference."""
    lp, old, mu, ref, ent, mask, adv = _random_batch(REFERENCE_SEEDS[per_token_adv], per_token_adv)
    logp, ent_leaf = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, m = policy_loss(logp, old, adv, mask, rollout_logp=mu, ref_logp=ref, entropy=ent_leaf, cfg=cfg)
    g_logp, g_ent = torch.autograd.grad(loss, [logp, ent_leaf], allow_unused=True)
    g_ent = torch.zeros_like(ent) if g_ent is None else g_ent  # no entropy bonus: the loss does not use it

    L = lambda x: x.tolist()  # noqa: E731
    adv_tok = L(adv if per_token_adv else adv[:, None].expand(-1, lp.shape[1]))
    args = [L(old), L(mu), L(ref)]
    want, want_m = _ref_loss(cfg, L(lp), *args, L(ent), adv_tok, L(mask))
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    for k, v in want_m.items():
        assert m[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k

    h = 1e-6  # central differences of the reference, stop-gradients frozen at lp
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            up, dn, e_up, e_dn = L(lp), L(lp), L(ent), L(ent)
            up[i][j] += h
            dn[i][j] -= h
            fd = (_ref_loss(cfg, up, *args, L(ent), adv_tok, L(mask), frozen=L(lp))[0]
                  - _ref_loss(cfg, dn, *args, L(ent), adv_tok, L(mask), frozen=L(lp))[0]) / (2 * h)
            assert g_logp[i, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (i, j)
            e_up[i][j] += h
            e_dn[i][j] -= h
            fd = (_ref_loss(cfg, L(lp), *args, e_up, adv_tok, L(mask))[0]
                  - _ref_loss(cfg, L(lp), *args, e_dn, adv_tok, L(mask))[0]) / (2 * h)
            assert g_ent[i, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (i, j)
    assert math.isfinite(loss.item()) and torch.all(g_logp[3] == 0)  # the empty sequence gets no gradient


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_reference_cases_exercise_both_sides_of_every_bound(per_token_adv):
    """Guards the test above: in each random batch it uses, every clip / mask / TIS bound of REFERENCE_CASES has
    trainable tokens on both sides, so a wrong bound cannot hide behind a batch that never reaches it."""
    batch = _random_batch(REFERENCE_SEEDS[per_token_adv], per_token_adv)
    lp, old, mu, ref, ent, mask, adv = [x.tolist() for x in batch]
    adv = adv if per_token_adv else [[a] * len(lp[0]) for a in adv]
    toks = [(i, t) for i in range(len(lp)) for t in range(len(lp[0])) if mask[i][t] > 0]
    rho = [math.exp(lp[i][t] - old[i][t]) for i, t in toks]
    r_mu = [math.exp(lp[i][t] - mu[i][t]) for i, t in toks]
    rho_mis = [math.exp(old[i][t] - mu[i][t]) for i, t in toks]

    def both_sides(xs, lo, hi):
        return min(xs) < lo and max(xs) > hi and any(lo < x < hi for x in xs)

    assert both_sides(rho, 0.8, 1.28)  # PPO 0.2 / 0.28
    assert any(0.72 < r < 0.8 or 1.2 < r < 1.28 for r in r_mu)  # default is_mask band vs its swapped eps
    assert both_sides(r_mu, 0.75, 1.2) and both_sides(r_mu, 0.9, 1.15)  # the ddis and narrow is_mask cases
    assert both_sides(rho_mis, 1 / 1.2, 1.2) and max(rho_mis) > 1.1  # IcePop β = 1.2, TIS C = 1.1
    assert min(rho_mis) < 0.9 and any(1 / 1.3 < r < 0.95 for r in rho_mis)  # the two tis_clip_low cases
    for cfg in (LossConfig(), LossConfig(loss_type="gspo", eps_low=0.02, eps_high=0.05)):
        _, met = _ref_loss(cfg, lp, old, mu, ref, ent, adv, mask)
        assert 0 < met["clipfrac"] < 1 and met["clipfrac_low"] > 0 and met["clipfrac_high"] > 0
    dual, _ = _ref_loss(LossConfig(dual_clip=1.2), lp, old, mu, ref, ent, adv, mask)
    plain, _ = _ref_loss(LossConfig(), lp, old, mu, ref, ent, adv, mask)
    assert dual < plain  # the dual clip bites on some negative-advantage token
    assert any(a > 0 for row in adv for a in row) and any(a < 0 for row in adv for a in row)


# ------------------------------------------------------------------------------------------- bounds, exactly
# Ratios below are exact in float64 (exp(log x) == x for x in {0.25, 0.5, 0.75, 1.25, 1.5, 2}, checked first), so
# the tests pin which side of each bound a token exactly on it falls.
def _exact_ratio_logs(*xs):
    logs = [math.log(x) for x in xs]
    assert torch.exp(t(logs)).tolist() == list(xs)
    return logs


def test_ddis_and_is_mask_bands_are_open_as_in_glm5_eq5():
    """GLM-5 §4.1.2 Eq. 5: f(x) = x if 1−ε_l < x < 1+ε_h, else 0. A token whose ratio π_θ/π_rollout sits exactly on
    1−ε_l or 1+ε_h is masked, by ``ddis`` and by ``is_mask`` alike (with ε = 0.25 the band is (0.75, 1.25))."""
    logs = _exact_ratio_logs(0.75, 1.25, 0.5, 1.5)
    rollout = t([[0.0] * 4])
    A, mask = t([1.0]), t([[1, 1, 1, 1]])
    logp = leaf([logs[:2] + [0.0, 0.0]])  # ratios 0.75 and 1.25 (on the bounds), then 1 and 1 (inside)
    for cfg in (LossConfig(loss_type="ddis", eps_low=0.25, eps_high=0.25),
                LossConfig(is_mask=True, is_eps_low=0.25, is_eps_high=0.25, eps_low=0.5, eps_high=0.5)):
        loss, m = policy_loss(logp, t([[0.0] * 4]), A, mask, rollout_logp=rollout, cfg=cfg)
        assert m["is_masked_frac"] == 0.5
        assert loss.item() == pytest.approx(-(1.0 + 1.0) / 4)
        assert grad_of(loss, logp)[0].tolist() == pytest.approx([0.0, 0.0, -0.25, -0.25])
    # just inside the bounds the tokens count again
    logp = leaf([[math.log(0.75) + 1e-9, math.log(1.25) - 1e-9, 0.0, 0.0]])
    loss, m = policy_loss(logp, t([[0.0] * 4]), A, mask, rollout_logp=rollout,
                          cfg=LossConfig(loss_type="ddis", eps_low=0.25, eps_high=0.25))
    assert m["is_masked_frac"] == 0.0
    assert loss.item() == pytest.approx(-(0.75 + 1.25 + 2.0) / 4)


def test_icepop_keeps_ratios_exactly_on_its_closed_bounds():
    """IcePop (GLM-5 Eq. 1, slime ``icepop_function``): pop(ρ) = ρ if 1/β ≤ ρ ≤ β, else 0, with ρ = π_old/μ and, by
    default, the lower bound 1/β. With β = 2: ρ = 0.5 and 2 are kept, 0.25 (< 1/β) is popped."""
    logs = _exact_ratio_logs(0.5, 2.0, 0.25)
    old = t([[0.0, 0.0, 0.0]])
    rollout = t([[-x for x in logs]])  # π_old/μ = 0.5, 2, 0.25
    logp = leaf([[0.0, 0.0, 0.0]])
    loss, m = policy_loss(logp, old, t([1.0]), t([[1, 1, 1]]), rollout_logp=rollout,
                          cfg=LossConfig(tis="icepop", tis_clip=2.0))
    assert loss.item() == pytest.approx(-(0.5 + 2.0 + 0.0) / 3)
    assert m["tis_clipfrac"] == pytest.approx(1 / 3)
    loss, _ = policy_loss(logp, old, t([1.0]), t([[1, 1, 1]]), rollout_logp=rollout,
                          cfg=LossConfig(tis="icepop", tis_clip=2.0, tis_clip_low=0.25))
    assert loss.item() == pytest.approx(-(0.5 + 2.0 + 0.25) / 3)  # an explicit lower bound replaces 1/β


def test_dual_clip_never_touches_positive_advantages():
    """The dual clip bounds −c·Â only for Â < 0 (slime ``--eps-clip-c``); a positive-advantage token far above 1+ε
    keeps the plain clipped value −(1+ε_high)·Â, which is below −c·Â."""
    logp = leaf([[math.log(5.0), math.log(1.1)]])
    loss, m = policy_loss(logp, t([[0.0, 0.0]]), t([2.0]), t([[1, 1]]), cfg=LossConfig(dual_clip=3.0))
    assert loss.item() == pytest.approx((-1.28 * 2.0 - 1.1 * 2.0) / 2)
    assert m["dual_clipfrac"] == 0.0


# ------------------------------------------------------------------------------------------- stop-gradients
def test_old_and_rollout_logprobs_are_constants_even_when_passed_with_grad():
    """At an on-policy first step a caller may pass the very tensor ``logp`` as ``old_logp`` / ``rollout_logp``.
    They are constants of the surrogate: the gradient must be the policy gradient −Â·m/N, not 0 (what you get when
    the ratio exp(logp − logp) is differentiated through both sides), and no gradient may reach them."""
    lp = leaf([[-1.0, -2.0, -0.5]])
    A, mask = t([2.0]), t([[1, 1, 1]])
    for cfg in (LossConfig(), LossConfig(loss_type="gspo"), LossConfig(loss_type="ddis"), LossConfig(is_mask=True)):
        logp = lp * 1.0  # a non-leaf with grad, like the trainer's log-probs
        loss, _ = policy_loss(logp, logp, A, mask, rollout_logp=logp, cfg=cfg)
        assert grad_of(loss, lp)[0].tolist() == pytest.approx([-2.0 / 3] * 3), cfg.loss_type
    old, mu = leaf([[-1.1, -2.0, -0.4]]), leaf([[-1.0, -1.9, -0.5]])
    loss, _ = policy_loss(lp, old, A, mask, rollout_logp=mu, cfg=LossConfig(tis="tis", is_mask=True))
    g_old, g_mu = torch.autograd.grad(loss, [old, mu], allow_unused=True)
    assert g_old is None and g_mu is None


def test_kl_and_entropy_terms_carry_gradient():
    """β·KL and −c_H·H are losses, not just metrics: ∂(k3)/∂logp = 1 − e^u with u = ref − logp, and the entropy bonus
    pushes every trainable token's entropy up by c_H/N."""
    logp = leaf([[-1.0, -2.0]])
    ref = t([[-1.5, -1.0]])
    loss, _ = policy_loss(logp, logp.detach(), t([0.0]), t([[1, 1]]), ref_logp=ref, cfg=LossConfig(kl_coef=0.1))
    want = [0.1 * (1 - math.exp(r - lp)) / 2 for r, lp in [(-1.5, -1.0), (-1.0, -2.0)]]
    assert grad_of(loss, logp)[0].tolist() == pytest.approx(want)
    ent = leaf([[0.7, 1.3, 0.2]])
    loss, _ = policy_loss(leaf([[0.0, 0.0, 0.0]]), t([[0.0, 0.0, 0.0]]), t([0.0]), t([[1, 1, 0]]), entropy=ent,
                          cfg=LossConfig(entropy_coef=0.01))
    assert grad_of(loss, ent)[0].tolist() == pytest.approx([-0.01 / 2, -0.01 / 2, 0.0])


# ------------------------------------------------------------------------------------------- log-probs, config
def test_token_logprobs_apply_the_sampling_temperature_and_upcast_half_logits():
    """The trainer must score tokens under the distribution the engine sampled from, softmax(logits / T); bf16 logits
    are upcast before the log-softmax so the log-probs (and the ratios built from them) are fp32."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    for temp in (0.6, 1.0, 1.7):
        lp, ent = token_logprobs_and_entropy(logits, targets, temperature=temp)
        p = torch.softmax(logits / temp, -1)
        assert torch.allclose(lp, p.gather(-1, targets[..., None]).squeeze(-1).log())
        assert torch.allclose(ent, -(p * p.log()).sum(-1))
    half = logits.to(torch.bfloat16)
    lp, ent = token_logprobs_and_entropy(half, targets, temperature=0.6)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    want = torch.log_softmax(half.double() / 0.6, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(lp.double(), want, atol=1e-5)


def test_loss_config_rejects_incoherent_settings():
    with pytest.raises(ValueError):
        LossConfig(eps_low=1.0)  # 1 − ε_low = 0: the lower clip would be a ratio of 0
    with pytest.raises(ValueError):
        LossConfig(eps_high=-0.1)
    with pytest.raises(ValueError):
        LossConfig(tis="is")
    with pytest.raises(ValueError):
        LossConfig(kl_type="k4")
    for cfg in (LossConfig(tis="tis"), LossConfig(tis="icepop"), LossConfig(loss_type="ddis")):
        assert cfg.needs_rollout_logp
        with pytest.raises(ValueError, match="need rollout_logp"):
            policy_loss(leaf([[0.0]]), t([[0.0]]), t([1.0]), t([[1.0]]), cfg=cfg)


def test_defaults_are_the_reference_settings():
    """The defaults are the settings the reference names (DAPO clip-higher 0.2 / 0.28 for the PPO clip and for the
    GLM-5 IS band, IcePop β = 2, no KL, no entropy bonus, token-level mean), checked by behaviour: under the default
    band (0.8, 1.28) a token at π_θ/μ = 1.25 is kept and one at 0.75 is masked (a swapped 0.28 / 0.2 band, (0.72,
    1.2), would do the opposite), and the default PPO clip lets a positive-advantage ratio of 1.25 keep learning."""
    cfg = LossConfig()
    assert (cfg.loss_type, cfg.agg, cfg.kl_coef, cfg.entropy_coef, cfg.tis, cfg.is_mask) == ("ppo", "token", 0, 0,
                                                                                            None, False)
    logs = _exact_ratio_logs(1.25, 0.75)
    logp = leaf([logs])
    loss, m = policy_loss(logp, logp.detach(), t([1.0]), t([[1, 1]]), rollout_logp=t([[0.0, 0.0]]),
                          cfg=LossConfig(is_mask=True))
    assert m["is_masked_frac"] == 0.5 and grad_of(loss, logp)[0].tolist() == pytest.approx([-0.5, 0.0])
    loss, m = policy_loss(logp, t([[0.0, 0.0]]), t([1.0]), t([[1, 1]]), cfg=LossConfig())
    assert m["clipfrac"] == 0.0 and grad_of(loss, logp)[0].tolist() == pytest.approx([-1.25 / 2, -0.75 / 2])
    logp = leaf([[math.log(1.3), math.log(0.79)]])  # just past 1 + 0.28 (A > 0) and 1 − 0.2 (A < 0): both clipped
    loss, m = policy_loss(logp, t([[0.0, 0.0]]), t([[1.0, -1.0]]), t([[1, 1]]), cfg=LossConfig())
    assert m["clipfrac_high"] == 0.5 and m["clipfrac_low"] == 0.5 and torch.all(grad_of(loss, logp) == 0)
    rollout = t([[-math.log(2.0), math.log(2.0) + 0.01]])  # π_old/μ = 2 (kept by β = 2) and just below 1/2 (popped)
    logp = leaf([[0.0, 0.0]])
    loss, _ = policy_loss(logp, t([[0.0, 0.0]]), t([1.0]), t([[1, 1]]), rollout_logp=rollout,
                          cfg=LossConfig(tis="icepop"))
    assert loss.item() == pytest.approx(-2.0 / 2)
