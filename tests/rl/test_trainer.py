"""RL train-step options on the project's optimisers: mini-batches with recomputed π_old, rollout log-probs as π_old,
GSPO / DDIS / KL to a reference through the trainer, micro-batch accumulation, frozen indexer and MTP layer."""

import random

import pytest
import torch

from glm5.rl.losses import LossConfig
from glm5.rl.sample import Sample, Status
from glm5.rl.trainer import RLTrainer, TrainerConfig
from glm5.rl.weight_sync import clone_model


def make_groups(trainer, vocab, n_groups=3, G=4, seed=0):
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 9))]
        grp = []
        for i in range(G):
            resp = [rng.randrange(3, vocab) for _ in range(rng.randint(18, 30))]
            s = Sample(prompt_ids=prompt, group_id=g, index=i, status=Status.COMPLETED, reward=float(rng.random() > 0.5))
            s.append(resp, [0.0] * len(resp), trainable=True)
            grp.append(s)
        grp[0].reward, grp[1].reward = 1.0, 0.0  # never zero variance
        groups.append(grp)
    samples = [s for g in groups for s in g]
    for s, lp in zip(samples, trainer.logprobs(samples)):  # rollout log-probs = the current policy's
        s.rollout_logprobs = lp.tolist()
    return groups


def test_frozen_parts_and_optimizer(policy):
    tr = RLTrainer(policy, TrainerConfig(optimizer="muon", lr=1e-3))
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert not any(".indexer." in n for n in names)
    assert not any(n.startswith(f"model.layers.{policy.config.num_hidden_layers}.") for n in names)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    tr.train_step(make_groups(tr, policy.config.vocab_size))
    for n, p in policy.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if ".indexer." in n or n.startswith(f"model.layers.{policy.config.num_hidden_layers}."):
            assert not changed, n
    assert any(not torch.equal(before[n], p.detach()) for n, p in policy.named_parameters() if n in names)


def test_micro_batches_equal_one_batch(policy):
    a, b = clone_model(policy), clone_model(policy)
    ta = RLTrainer(a, TrainerConfig(lr=1e-3, micro_batch_tokens=1 << 20, grad_clip=0.0))
    tb = RLTrainer(b, TrainerConfig(lr=1e-3, micro_batch_tokens=40, grad_clip=0.0))  # one sample per forward
    groups = make_groups(ta, a.config.vocab_size)
    ma = ta.train_step(groups)
    mb = tb.train_step(groups)
    assert ma["pg_loss"] == pytest.approx(mb["pg_loss"], abs=1e-6)
    assert ma["entropy"] == pytest.approx(mb["entropy"], rel=1e-6)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)  # accumulated gradient = full-batch one


def test_minibatches_recompute_old_logprobs(policy):
    tr = RLTrainer(policy, TrainerConfig(lr=1e-2, updates_per_batch=3))
    m = tr.train_step(make_groups(tr, policy.config.vocab_size, n_groups=3))
    assert tr.version == 1  # one rollout batch = one weight version, whatever the number of optimiser steps
    assert m["ratio_mean"] != 1.0  # later mini-batches see the policy moved away from π_old
    assert m["rollout_ratio_mean"] != 1.0  # ... and from the rollout policy
    assert m["logprob_gap_mean"] < 1e-5  # the gap is the policy's before the update (test_first_use)


@pytest.mark.parametrize("loss", [LossConfig(loss_type="gspo", eps_low=3e-4, eps_high=4e-4),
                                  LossConfig(loss_type="ddis"), LossConfig(tis="icepop"),
                                  LossConfig(kl_coef=0.1, kl_type="k3", entropy_coef=1e-3, agg="seq")])
def test_loss_variants_through_the_trainer(policy, loss):
    tr = RLTrainer(policy, TrainerConfig(lr=1e-3, loss=loss))
    groups = make_groups(tr, policy.config.vocab_size)
    m = tr.train_step(groups)
    assert m["logprob_gap_mean"] < 1e-5 and abs(m["rollout_ratio_mean"] - 1) < 1e-5
    if loss.kl_coef:
        assert tr.ref_model is not None and m["kl"] == pytest.approx(0.0, abs=1e-6)  # first step: π_θ = π_ref
        m2 = tr.train_step(groups)
        assert m2["kl"] > 0
    if loss.loss_type == "ddis":
        assert m["is_masked_frac"] == 0.0


def test_rollout_logprobs_as_old(policy):
    tr = RLTrainer(policy, TrainerConfig(lr=1e-3, old_logp="rollout"))
    groups = make_groups(tr, policy.config.vocab_size)
    for g in groups:
        for s in g:
            s.rollout_logprobs = [x - 0.05 for x in s.rollout_logprobs]  # behaviour policy slightly different
    m = tr.train_step(groups)
    assert m["ratio_mean"] == pytest.approx(torch.exp(torch.tensor(0.05)).item(), rel=1e-4)


def test_reset_optimizer_after_push(policy):
    tr = RLTrainer(policy, TrainerConfig(lr=1e-3, reset_optimizer=True))
    tr.train_step(make_groups(tr, policy.config.vocab_size))
    state_before = sum(len(o.state) for o in tr.optim)
    tr.after_push()
    assert state_before > 0 and sum(len(o.state) for o in tr.optim) == 0


def test_freeze_router_keeps_expert_choice_fixed(policy):
    m = clone_model(policy)
    tr = RLTrainer(m, TrainerConfig(lr=1e-2, freeze_router=True))
    gates = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(".mlp.gate.weight")}
    assert gates and not any(p.requires_grad for n, p in m.named_parameters() if n in gates)
    tr.train_step(make_groups(tr, m.config.vocab_size))
    assert all(torch.equal(gates[n], p.detach()) for n, p in m.named_parameters() if n in gates)
    assert any(p.requires_grad for n, p in m.named_parameters() if ".experts." in n)


def test_online_mtp_training_leaves_the_policy_update_unchanged(policy):
    # slime-style online MTP training: the MTP layer learns beside the policy by self-distillation, with the main
    # model's hidden states, embedding and head detached and its own gradient clip, so every policy parameter
    # must end the step exactly where it would without it, while the MTP layer moves and its KL falls.
    n_main = policy.config.num_hidden_layers
    is_mtp = lambda n: n.startswith(f"model.layers.{n_main}.")  # noqa: E731
    a, b = clone_model(policy), clone_model(policy)
    ta = RLTrainer(a, TrainerConfig(lr=1e-3, grad_clip=0.5))
    tb = RLTrainer(b, TrainerConfig(lr=1e-3, grad_clip=0.5, mtp_weight=1.0, mtp_depth=2))
    groups = make_groups(ta, a.config.vocab_size)
    ma = ta.train_step(groups)
    mb = tb.train_step(groups)
    assert mb["pg_loss"] == ma["pg_loss"] and mb["grad_norm"] == ma["grad_norm"]
    assert "mtp_kl" not in ma and mb["mtp_kl"] > 0 and mb["mtp_grad_norm"] > 0
    before = dict(policy.named_parameters())
    moved = []
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if is_mtp(n):
            assert torch.equal(pa, before[n]), n  # frozen without mtp_weight
            moved.append(not torch.equal(pb, before[n]))
        else:
            assert torch.equal(pa, pb), n  # the policy's update is bit-identical
    assert sum(moved) > len(moved) // 2
    # With equal rewards (zero advantages) the policy, the teacher, stands still: the MTP KL must then fall.
    c = clone_model(policy)
    tc = RLTrainer(c, TrainerConfig(lr=1e-3, mtp_weight=1.0, mtp_depth=2, mtp_lr=2e-3))
    for s in (s for g in groups for s in g):
        s.reward = 1.0
    kls = [tc.train_step(groups)["mtp_kl"] for _ in range(8)]
    assert all(x > y for x, y in zip(kls, kls[1:])) and kls[-1] < 0.7 * kls[0], kls
    assert all(torch.equal(p, before[n]) for n, p in c.named_parameters() if not is_mtp(n))
    mtp_ids = {id(p) for n, p in c.named_parameters() if is_mtp(n)}
    lrs = {(all(id(p) in mtp_ids for p in g["params"]), g["lr"]) for g in tc.optim.param_groups}
    assert lrs == {(False, 1e-3), (True, 2e-3)}  # the MTP layer has its own learning rate


def test_online_mtp_training_needs_an_mtp_layer(make_config):
    from glm5.model.transformer import GLM5ForCausalLM

    no_mtp = GLM5ForCausalLM(make_config(num_nextn_predict_layers=0)).init_weights(0)
    with pytest.raises(ValueError, match="MTP layer"):
        RLTrainer(no_mtp, TrainerConfig(mtp_weight=0.5))
    with pytest.raises(ValueError, match="mtp_depth"):
        TrainerConfig(mtp_weight=0.5, mtp_depth=0)
    with pytest.raises(ValueError, match="mtp_lr"):
        TrainerConfig(mtp_weight=0.5, mtp_lr=0.0)
