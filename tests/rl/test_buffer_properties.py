"""Property test of the RL data buffer: random interleavings of submissions, finished and interrupted samples
(partial rollouts), weight-version bumps and batch pops. Every submitted group is accounted for exactly once
(consumed, or dropped and counted), every consumed group is whole and within the staleness bound."""

from hypothesis import given, settings
from hypothesis import strategies as st

from glm5.rl.buffer import DataBuffer
from glm5.rl.sample import Status

TASKS = [{"id": f"t{i}", "question": str(i)} for i in range(7)]

ops = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 12)),
    st.tuples(st.just("finish"), st.integers(0, 99), st.sampled_from(["completed", "truncated", "failed"]),
              st.sampled_from([0.0, 1.0, -1.0])),
    st.tuples(st.just("interrupt"), st.integers(0, 99), st.integers(0, 3)),
    st.tuples(st.just("bump")),
    st.tuples(st.just("pop"), st.integers(1, 3)),
), max_size=60)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(group_size=st.integers(1, 4), tau=st.sampled_from([None, 0, 1, 2]), dynamic=st.booleans(),
       partial=st.booleans(), script=ops)
def test_every_group_is_consumed_or_counted_once(group_size, tau, dynamic, partial, script):
    buf = DataBuffer(TASKS, lambda t: [1, 2, 3], group_size, 8, seed=1, tau=tau, dynamic_sampling=dynamic,
                     partial_rollout=partial)
    flight, consumed, version = [], [], 0

    def run_token(s):  # one generated token on the current weights
        s.append([5], [-0.5], True)
        s.weight_versions.append(version)

    def pop(n):
        batch = buf.pop_batch(n, version)
        if batch is None:
            return
        assert len(batch) == n
        for g in batch:
            assert [s.index for s in g] == list(range(group_size)) and len({s.group_id for s in g}) == 1
            assert all(s.finished and s.status != Status.FAILED for s in g)
            if tau is not None:
                assert all(s.staleness(version) <= tau for s in g)
            consumed.append(g[0].group_id)

    for op in script:
        if op[0] == "submit":
            flight.extend(buf.get_work(op[1], rollout_id=version))
        elif op[0] == "finish" and flight:
            s = flight.pop(op[1] % len(flight))
            run_token(s)
            s.status, s.reward = Status(op[2]), op[3] + 0.1 * s.index * (op[3] != 0)
            buf.add_finished(s)
        elif op[0] == "interrupt" and flight:
            s = flight.pop(op[1] % len(flight))
            for _ in range(op[2]):
                run_token(s)
            s.status = Status.ABORTED
            buf.add_partial(s)
        elif op[0] == "bump":
            version += 1
        elif op[0] == "pop":
            pop(op[1])
    # drain: everything in flight or waiting to resume finishes, then every ready group is popped
    flight.extend(buf.get_work(len(buf._resume), rollout_id=version, new_groups=0))
    for s in flight:
        run_token(s)
        s.status, s.reward = Status.COMPLETED, float(s.index)
        buf.add_finished(s)
    assert buf.num_outstanding == 0 and buf.num_resumable == 0
    while buf.num_ready:
        before = buf.num_ready
        pop(1)
        if buf.num_ready == before:
            break
    st_ = buf.stats
    assert len(consumed) == len(set(consumed)) == st_.groups_consumed
    assert st_.groups_submitted == (st_.groups_consumed + st_.dropped_zero_std_groups + st_.dropped_stale_groups
                                    + st_.dropped_failed_groups + buf.num_ready)
    assert sum(st_.staleness_hist.values()) == group_size * st_.groups_consumed
