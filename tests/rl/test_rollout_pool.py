"""Rollout data parallelism (``RolloutPool``): routing and bookkeeping on scripted clients, then real worker
processes that must all hold the pushed weights (shared memory and a torch.distributed broadcast group), and
``glm5 rl --rollout-workers 2`` end to end."""

import json
import time

import pytest
import torch

from glm5.engine import build_engine
from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.rollout import RolloutConfig, RolloutEngine
from glm5.rl.rollout_worker import WorkerSpec
from glm5.rl.rollout_pool import RolloutPool, launch_process_pool
from glm5.rl.runner import RLConfig
from glm5.rl.sample import Sample
from glm5.rl.weight_sync import clone_model, free_port


class ScriptedClient:
    """Holds what it is given; ``finish(k)`` completes its first k samples at the next poll."""

    def __init__(self):
        self.held, self.ready, self.pushed = [], [], []
        self.version = 0

    def make_prompt(self, task):
        return [1, 2, 3]

    def submit(self, samples):
        self.held.extend(samples)

    def finish(self, k):
        self.ready, self.held = self.held[:k], self.held[k:]

    def poll(self, timeout=0.0):
        done, self.ready = self.ready, []
        return [("finished", done, {})] if done else []

    def abort(self):
        out, self.held = self.held, []
        return out

    def update_weights(self, model, version, abort=True):
        self.pushed.append(version)
        self.version = version
        return self.abort()

    def stats(self):
        return {"requests": len(self.held), "busy_s": 1.5}

    def close(self):
        pass


def groups(n_groups, size, start=0):
    return [Sample(prompt_ids=[1], task={}, group_id=g, index=i) for g in range(start, start + n_groups)
            for i in range(size)]


def test_pool_routes_whole_groups_to_the_least_loaded_worker():
    a, b, c = ScriptedClient(), ScriptedClient(), ScriptedClient()
    pool = RolloutPool([a, b, c])
    pool.submit(groups(3, 4))
    assert [len(x.held) for x in (a, b, c)] == [4, 4, 4]
    for x in (a, b, c):  # a group never straddles two engines (it shares one prompt's prefix-cache blocks)
        assert len({s.group_id for s in x.held}) == 1
    a.finish(4)
    evs = pool.poll(0)
    assert len(evs) == 1 and len(evs[0][1]) == 4 and pool.load == [0, 4, 4]
    pool.submit(groups(2, 2, start=3))  # both go to a: load 0, then 2 < 4
    assert pool.load == [4, 4, 4] and len(a.held) == 4
    out = pool.abort()
    assert len(out) == 12 and pool.load == [0, 0, 0] and not pool.has_work
    pool.submit(groups(1, 3, start=9))
    partial = pool.update_weights(None, 7)
    assert len(partial) == 3 and pool.version == 7 and [x.pushed for x in (a, b, c)] == [[7]] * 3
    assert pool.load == [0, 0, 0]
    st = pool.stats()
    assert st["num_workers"] == 3 and st["busy_s"] == 4.5 and len(st["workers"]) == 3


def test_pool_poll_waits_for_the_first_event_then_returns():
    a = ScriptedClient()
    pool = RolloutPool([a, ScriptedClient()])
    t = time.monotonic()
    assert pool.poll(0.05) == []
    assert time.monotonic() - t >= 0.04


def test_config_rejects_bad_worker_counts():
    with pytest.raises(ValueError, match="rollout_workers"):
        RLConfig(model="m", rollout_workers=0)
    with pytest.raises(ValueError, match="colocate"):
        RLConfig(model="m", rollout_workers=2, placement="colocate")
    with pytest.raises(ValueError, match="at least one"):
        RolloutPool([])


def _drain(pool, n, timeout=120.0):
    done, deadline = [], time.monotonic() + timeout
    while len(done) < n:
        assert time.monotonic() < deadline, f"only {len(done)}/{n} samples came back"
        for ev in pool.poll(0.05):
            assert ev[0] == "finished", ev[0]
            done.extend(ev[1])
    return done


@pytest.mark.parametrize("transport", ["shm", "dist"])
def test_every_worker_serves_the_pushed_weights(model_dir, tok, tasks, make_config, transport):
    """Two worker processes, one pool-wide transport: after a push of different weights, every group (spread
    over both workers) decodes greedily exactly as a local engine holding those weights does."""
    policy = GLM5ForCausalLM.from_pretrained(model_dir)
    other = GLM5ForCausalLM(make_config()).init_weights(321)
    rcfg = RolloutConfig(max_new_tokens=12, temperature=0.0)
    dist = {"host": "127.0.0.1", "port": free_port(), "backend": "gloo"} if transport == "dist" else {}
    spec = WorkerSpec(str(model_dir), rcfg.to_dict(), {"max_num_seqs": 16, "max_model_len": 256}, threads=1,
                      weight_transport=transport, dist=dist)
    ref = RolloutEngine(build_engine(clone_model(other), tok, max_num_seqs=16, max_model_len=256), tok, rcfg)
    pool = launch_process_pool(spec, 2, policy, make_prompt=ref.make_prompt)
    try:
        assert pool.update_weights(other, 1) == []
        work = [Sample(prompt_ids=ref.make_prompt(t), task=t, group_id=i, index=j, max_new_tokens=12)
                for i, t in enumerate(tasks[:4]) for j in range(2)]
        pool.submit(work)
        assert pool.load == [4, 4]
        got = _drain(pool, 8)
        stats = pool.stats()
    finally:
        pool.close()
    assert all(not c.proc.is_alive() for c in pool.clients)
    assert [w["finished"] for w in stats["workers"]] == [4, 4]
    want = ref.generate([Sample(prompt_ids=ref.make_prompt(t), task=t, group_id=i, index=0, max_new_tokens=12)
                         for i, t in enumerate(tasks[:4])])
    want = {s.group_id: s for s in want}
    for s in got:
        assert s.weight_versions == [1]
        assert s.response_ids == want[s.group_id].response_ids
        assert torch.allclose(torch.tensor(s.rollout_logprobs), torch.tensor(want[s.group_id].rollout_logprobs),
                              atol=1e-5)


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_cli_async_with_two_rollout_workers(model_dir, tmp_path):
    from glm5.cli import main

    out = tmp_path / "run"
    import os

    ctx = pytest.warns(UserWarning, match="want 3 threads") if (os.cpu_count() or 1) < 3 else _no_warning()
    with ctx:  # 3 single-thread processes on a 2-core box: contention is expected, and said
        rc = main(["rl", "--model", str(model_dir), "--out", str(out), "--task", "arith", "--n-train", "32",
                   "--steps", "3", "--groups", "2", "--group-size", "2", "--max-new-tokens", "12", "--max-model-len",
                   "256", "--mode", "async", "--rollout-workers", "2", "--no-eval", "--no-save", "--no-progress",
                   "--train-threads", "1", "--rollout-threads", "1"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_version"] for r in recs] == [1, 2, 3]
    assert all(r["staleness_max"] <= 2 for r in recs)
    s = json.loads((out / "summary.json").read_text())
    workers = s["rollout_stats"]["workers"]
    assert len(workers) == 2 and all(w["requests"] > 0 for w in workers)


def test_a_killed_worker_fails_the_pool_fast(model_dir, tok, tasks):
    """Fault injection: SIGKILL one of two rollout workers mid-generation; the pool's next polls raise a clear
    error within seconds (not after the manager's hour-long no-progress timeout), and close() still works."""
    import os
    import signal

    policy = GLM5ForCausalLM.from_pretrained(model_dir)
    rcfg = RolloutConfig(max_new_tokens=200, temperature=1.0)
    spec = WorkerSpec(str(model_dir), rcfg.to_dict(), {"max_num_seqs": 16, "max_model_len": 256}, threads=1)
    ref = RolloutEngine(build_engine(clone_model(policy), tok, max_num_seqs=1, max_model_len=256), tok, rcfg)
    pool = launch_process_pool(spec, 2, policy, make_prompt=ref.make_prompt)
    try:
        pool.submit([Sample(prompt_ids=ref.make_prompt(t), task=t, group_id=i, index=0, max_new_tokens=200)
                     for i, t in enumerate(tasks[:4])])
        os.kill(pool.clients[1].proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rollout worker 1 of 2.*died"):
            while time.monotonic() - t0 < 60:
                pool.poll(0.05)
        assert time.monotonic() - t0 < 30
    finally:
        pool.close()
    assert all(not c.proc.is_alive() for c in pool.clients)


def test_oversubscribed_cpu_placement_is_warned_about(monkeypatch):
    from glm5.rl import runner

    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    cfg = RLConfig(model="m", rollout_workers=2, manager={"mode": "async"})
    assert runner.oversubscription_warning(cfg, 1, 1) is not None  # 2 × 1 + 1 threads on 2 cores
    assert runner.oversubscription_warning(cfg, 1, 1).startswith("2 rollout worker(s)")
    assert runner.oversubscription_warning(RLConfig(model="m", manager={"mode": "async"}), 1, 1) is None
    sync = RLConfig(model="m", rollout_workers=2, manager={"mode": "sync"})
    assert runner.oversubscription_warning(sync, 2, 1) is None  # sync: the two sides take turns
    assert runner._threads(sync) == (2, 1)  # the rollout workers share the cores
    assert runner._threads(cfg) == (1, 1)
