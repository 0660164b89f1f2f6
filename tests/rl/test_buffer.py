"""Data buffer: groups, partial-rollout resume, dynamic sampling, the staleness bound and its counters."""

import pytest

from glm5.rl.buffer import DataBuffer
from glm5.rl.sample import Sample, Status

TASKS = [{"question": f"q{i}", "answer": str(i), "answerable": True} for i in range(10)]


def make(**kw):
    return DataBuffer(TASKS, lambda t: [1, 2, len(t["question"])], group_size=4, max_new_tokens=8, shuffle=False, **kw)


def finish(s: Sample, reward: float, version: int = 0, status=Status.COMPLETED):
    s.append([5, 6], [-0.1, -0.2], trainable=True)
    s.weight_versions.append(version)
    s.status = status
    s.reward = reward
    return s


def test_groups_and_order():
    b = make()
    work = b.get_work(9)
    assert len(work) == 8  # only whole new groups
    assert [s.group_id for s in work] == [0] * 4 + [1] * 4 and [s.index for s in work[:4]] == [0, 1, 2, 3]
    assert all(s.prompt_ids == work[0].prompt_ids for s in work[:4]) and work[0].task is work[3].task
    for s in work[:3]:
        assert b.add_finished(finish(s, 1.0)) is None
    group = b.add_finished(finish(work[3], 0.0))
    assert [s.index for s in group] == [0, 1, 2, 3]
    batch = b.pop_batch(1, current_version=0)
    assert batch == [group] and b.pop_batch(1, 0) is None


def test_partial_rollouts_resume_first():
    b = make(partial_rollout=True)
    work = b.get_work(8)
    s = work[2]
    s.append([7, 8, 9], [-1.0, -1.0, -1.0], trainable=True)
    s.weight_versions.append(0)
    s.status = Status.ABORTED
    b.add_partial(s)
    nxt = b.get_work(4)
    assert nxt[0] is s and s.status == Status.PENDING and s.response_ids == [7, 8, 9] and s.resumed == 1
    assert b.stats.samples_resumed == 1
    b2 = make(partial_rollout=False)
    w = b2.get_work(4)
    w[0].append([7], [-1.0], trainable=True)
    b2.add_partial(w[0])
    assert w[0].response_ids == [] and w[0].weight_versions == [] and b2.stats.samples_restarted == 1


def test_dynamic_sampling_drops_zero_variance_groups():
    b = make(dynamic_sampling=True)
    work = b.get_work(12)
    for s in work[:4]:
        b.add_finished(finish(s, 1.0))  # all right: no signal
    for s in work[4:8]:
        b.add_finished(finish(s, -1.0))  # all wrong: no signal
    for s, r in zip(work[8:], [1.0, -1.0, 0.0, 1.0]):
        b.add_finished(finish(s, r))
    assert b.stats.dropped_zero_std_groups == 2 and b.num_ready == 1
    assert b.pop_batch(1, 0)[0][0].group_id == 2
    nodyn = make(dynamic_sampling=False)
    for s in nodyn.get_work(4):
        nodyn.add_finished(finish(s, 1.0))
    assert nodyn.num_ready == 1


def test_dynamic_sampling_treats_float_noise_as_zero_variance():
    """A plugin reward computed in floating point (0.1 + 0.2 vs 0.3) differs by ~1e-16 between samples of the same
    quality: that group still has no signal and is dropped (reward spread within 1e-6), while a real spread of 1e-3
    is kept."""
    b = make(dynamic_sampling=True)
    work = b.get_work(8)
    for s, r in zip(work[:4], [0.3, 0.1 + 0.2, 0.3, 0.3]):
        b.add_finished(finish(s, r))
    for s, r in zip(work[4:], [0.3, 0.301, 0.3, 0.3]):
        b.add_finished(finish(s, r))
    assert 0.1 + 0.2 != 0.3  # the noise is real
    assert b.stats.dropped_zero_std_groups == 1 and b.num_ready == 1
    assert b.pop_batch(1, 0)[0][0].group_id == 1


def test_staleness_bound_drops_and_counts():
    b = make(tau=1)
    work = b.get_work(12)
    versions = [[3, 3, 3, 3], [2, 2, 2, 1], [2, 2, 2, 2]]  # at current version 3: staleness 0 / up to 2 / 1
    for k in range(3):
        for s, v in zip(work[4 * k: 4 * k + 4], versions[k]):
            b.add_finished(finish(s, float(s.index), version=v))
    batch = b.pop_batch(2, current_version=3)
    assert [g[0].group_id for g in batch] == [0, 2]
    assert b.stats.dropped_stale_groups == 1 and b.stats.dropped_stale_samples == 1
    assert dict(b.stats.staleness_hist) == {0: 4, 1: 4}
    # a resumed partial sample keeps its oldest version: staleness counts from there
    s = Sample(prompt_ids=[1], weight_versions=[1, 3])
    assert s.staleness(3) == 2 and s.oldest_version == 1


def test_failed_samples_padding_rule():
    b = make()
    work = b.get_work(8)
    finish(work[0], 1.0)
    finish(work[1], -1.0)
    finish(work[2], 1.0)
    finish(work[3], 0.0, status=Status.FAILED)
    for s in work[:4]:
        b.add_finished(s)
    g = b.pop_batch(1, 0)[0]
    assert len(g) == 4 and all(s.status != Status.FAILED for s in g) and b.stats.padded_groups == 1
    for k, s in enumerate(work[4:]):
        finish(s, 1.0, status=Status.FAILED if k < 2 else Status.COMPLETED)
        b.add_finished(s)
    assert b.stats.dropped_failed_groups == 1 and b.num_ready == 0


def test_sample_append_and_checks():
    s = Sample(prompt_ids=[1, 2])
    s.append([3, 4], [-0.5, -0.25], trainable=True)
    s.append([9, 9, 9], None, trainable=False)
    assert s.tokens == [1, 2, 3, 4, 9, 9, 9] and s.loss_mask == [1, 1, 0, 0, 0]
    assert s.rollout_logprobs == [-0.5, -0.25, 0.0, 0.0, 0.0] and s.num_model_tokens == 2
    with pytest.raises(ValueError):
        s.append([1], [0.0, 0.0], trainable=True)
    d = s.to_dict()
    assert Sample.from_dict(d).tokens == s.tokens and d["status"] == "pending"
    b = make()
    with pytest.raises(KeyError):
        b.add_finished(finish(Sample(prompt_ids=[1], group_id=99), 0.0))
