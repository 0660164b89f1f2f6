"""Tensor-parallel rollout workers (``glm5 rl --rollout-tp N``, glm5.rl.rollout_tp): the weight slicing against
``apply_tensor_parallel`` (no processes); a worker split over 2 gloo ranks decoding exactly what a one-process
engine decodes, before and after a weight push, over both transports; RL runs with it; and no process left behind
when the trainer is killed, one of the worker's ranks is killed, or the worker is stopped."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from glm5.engine import build_engine
from glm5.model.tensor_parallel import TensorParallel, apply_tensor_parallel
from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.rollout import RolloutConfig, RolloutEngine
from glm5.rl.rollout_client import ProcessRolloutClient
from glm5.rl.rollout_pool import launch_process_pool
from glm5.rl.rollout_tp import pid_alive
from glm5.rl.rollout_worker import WorkerSpec
from glm5.rl.runner import RLConfig
from glm5.rl.sample import Sample
from glm5.rl.weight_sync import clone_model, free_port, full_layout, load_weights, named_weights, shard_weight

from .test_rollout_pool import _drain as drain

ENGINE = {"max_num_seqs": 16, "max_model_len": 256}


def _gone(pids, within=10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------------------------------- no processes
@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_loads_the_slice_apply_tensor_parallel_keeps(make_config, rank):
    """Whole weights pushed into a shard become exactly the shard ``apply_tensor_parallel`` cuts from them, and
    the receive layout is the whole model's (what the trainer sends)."""
    a = GLM5ForCausalLM(make_config()).init_weights(1)
    b = GLM5ForCausalLM(make_config()).init_weights(2)
    tp = TensorParallel(rank, 2)
    shard = apply_tensor_parallel(clone_model(a), tp, collectives=False)
    want = named_weights(apply_tensor_parallel(clone_model(b), tp, collectives=False))
    whole = named_weights(b)
    assert {k: tuple(v.shape) for k, v in full_layout(shard).items()} == {k: tuple(v.shape) for k, v in whole.items()}
    split = [k for k in whole if shard_weight(k, whole[k], tp).shape != whole[k].shape]
    assert any("gate_up_proj" in k for k in split) and "lm_head.weight" in split  # the split really happens
    assert load_weights(shard, whole) == len(whole)
    got = named_weights(shard)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_rollout_tp_is_validated_at_the_edge(model_dir, tmp_path):
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="rollout_tp must be a positive integer"):
            RLConfig(model="m", rollout_tp=bad)
    for placement in ("colocate", "ray"):
        with pytest.raises(ValueError, match="rollout_tp=2 needs placement 'process'"):
            RLConfig(model="m", rollout_tp=2, placement=placement)
    RLConfig(model="m", rollout_tp=2, rollout_workers=2)  # several tensor-parallel workers are fine
    from glm5.rl.ray_launcher import RayRolloutClient

    with pytest.raises(ValueError, match="placement 'process'"):  # before Ray is even imported
        RayRolloutClient(WorkerSpec("m", {}, tp=2))
    with pytest.raises(ValueError, match="no room for this worker's 2 tensor-parallel rank"):  # before any start
        ProcessRolloutClient(WorkerSpec("m", {}, weight_transport="dist", tp=2,
                                        dist={"host": "127.0.0.1", "port": 1, "rank": 1, "world_size": 2}))
    from glm5.cli import build_parser
    from glm5.rl.cli import config_from_args

    a = build_parser().parse_args(["rl", "--model", str(model_dir), "--rollout-tp", "2", "--rollout-workers", "2"])
    assert config_from_args(a).rollout_tp == 2
    from glm5.rl.runner import run_rl

    # glm5-nano has 4 attention heads: 3 ranks cannot split them; said before any process starts
    import warnings

    with pytest.raises(ValueError, match="rollout_tp=3: tensor_parallel_size=3 must divide num_attention_heads"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small box warns about 3 rollout processes first
        run_rl(RLConfig(model=str(model_dir), out=str(tmp_path / "o"), tasks=["arith"], n_train=8, n_eval=0,
                        rollout_tp=3, eval_before=False), handle_signals=False)


def test_rollout_workers_on_cuda_take_gpus_of_their_own(monkeypatch):
    from glm5.rl.rollout_tp import check_rollout_gpus, rank_device, worker_devices

    # worker w's rank r runs on GPU base + w·tp + r; a CPU layout is left alone
    assert worker_devices("cuda", 2, 2) == ["cuda:0", "cuda:2"]
    assert worker_devices("cuda:1", 3, 1) == ["cuda:1", "cuda:2", "cuda:3"]
    assert [rank_device(d, r) for d in worker_devices("cuda:1", 2, 2) for r in range(2)] == \
        ["cuda:1", "cuda:2", "cuda:3", "cuda:4"]
    assert worker_devices("cpu", 3, 2) == ["cpu"] * 3 and rank_device("cpu", 1) == "cpu"
    check_rollout_gpus("cuda:1", 2, 2, device_count=5)
    check_rollout_gpus("cpu", 8, 8, device_count=0)
    with pytest.raises(ValueError, match=r"need GPUs 1\.\.4, but this machine has 4"):
        check_rollout_gpus("cuda:1", 2, 2, device_count=4)
    # the pool hands each worker its own first GPU (clients faked: nothing is started)
    got = []

    class FakeClient:
        def __init__(self, spec, **kw):
            got.append(spec)

        def wait_ready(self, timeout):
            pass

    monkeypatch.setattr("glm5.rl.rollout_client.ProcessRolloutClient", FakeClient)
    monkeypatch.setattr("glm5.rl.weight_sync.DistWeightSender", lambda *a: None)
    spec = WorkerSpec("m", {}, device="cuda:1", tp=2, weight_transport="dist",
                      dist={"host": "127.0.0.1", "port": 1, "rank": 1, "world_size": 5})
    launch_process_pool(spec, 2)
    assert [(s.device, s.dist["rank"], s.dist["world_size"]) for s in got] == [("cuda:1", 1, 5), ("cuda:3", 3, 5)]


# ---------------------------------------------------------------------------------------- real workers
def _samples(ref, tasks, n=4, budget=12):
    return [Sample(prompt_ids=ref.make_prompt(t), task=t, group_id=i, index=0, max_new_tokens=budget)
            for i, t in enumerate(tasks[:n])]


def _drain(client, n, timeout=120.0):
    return {s.group_id: s for s in drain(client, n, timeout)}


def _assert_same(got, want, version):
    assert got.keys() == want.keys()
    for g, w in want.items():
        assert got[g].weight_versions == [version]
        assert got[g].response_ids == w.response_ids, g
        assert torch.allclose(torch.tensor(got[g].rollout_logprobs), torch.tensor(w.rollout_logprobs), atol=1e-5)


# the default suite keeps the dist case, which also drafts with MTP over the group (the suite's time budget)
@pytest.mark.parametrize("transport,spec_tokens", [pytest.param("shm", 0, marks=pytest.mark.slow), ("dist", 2)])
def test_tp2_worker_decodes_what_one_process_decodes_before_and_after_a_push(model_dir, tok, tasks, make_config,
                                                                              transport, spec_tokens):
    """A rollout worker over 2 ranks: greedy tokens and log-probs equal to a one-process engine's on the same
    weights; after a push of other weights, equal to the one-process engine holding those, stamped with the new
    version. Stopping the worker stops both of its processes. (With ``spec_tokens`` the split engine drafts with
    the MTP layer, whose calls the follower repeats too; greedy output is unchanged by speculation.)"""
    policy = GLM5ForCausalLM.from_pretrained(model_dir)
    other = GLM5ForCausalLM(make_config()).init_weights(321)
    rcfg = RolloutConfig(max_new_tokens=12, temperature=0.0)
    dist = {}
    if transport == "dist":
        dist = {"host": "127.0.0.1", "port": free_port(), "rank": 1, "world_size": 3, "backend": "gloo"}
    spec = WorkerSpec(str(model_dir), rcfg.to_dict(), {**ENGINE, "num_speculative_tokens": spec_tokens}, threads=1,
                      weight_transport=transport, dist=dist, tp=2)
    ref = RolloutEngine(build_engine(clone_model(policy), tok, **ENGINE), tok, rcfg)
    client = ProcessRolloutClient(spec, policy, make_prompt=ref.make_prompt)
    try:
        assert len(client.pids) == 2
        client.submit(_samples(ref, tasks))
        before = _drain(client, 4)
        want = {s.group_id: s for s in ref.generate(_samples(ref, tasks))}
        _assert_same(before, want, 0)
        assert client.update_weights(other, 1) == [] and client.version == 1
        ref.load_weights(named_weights(other), 1)
        client.submit(_samples(ref, tasks))
        after = _drain(client, 4)
        want = {s.group_id: s for s in ref.generate(_samples(ref, tasks))}
        _assert_same(after, want, 1)
        assert any(after[g].response_ids != before[g].response_ids for g in after)  # the push changed the output
        assert client.stats()["finished"] == 8
    finally:
        pids = client.pids
        client.close()
    assert _gone(pids, within=1.0)


@pytest.mark.slow
def test_a_pool_of_two_tp2_workers_serves_the_pushed_weights(model_dir, tok, tasks, make_config):
    """rollout_workers=2 × rollout_tp=2 over one broadcast group of 5 ranks (trainer + 4 shards)."""
    policy = GLM5ForCausalLM.from_pretrained(model_dir)
    other = GLM5ForCausalLM(make_config()).init_weights(321)
    rcfg = RolloutConfig(max_new_tokens=12, temperature=0.0)
    spec = WorkerSpec(str(model_dir), rcfg.to_dict(), ENGINE, threads=1, weight_transport="dist", tp=2,
                      dist={"host": "127.0.0.1", "port": free_port(), "backend": "gloo"})
    ref = RolloutEngine(build_engine(clone_model(other), tok, **ENGINE), tok, rcfg)
    pool = launch_process_pool(spec, 2, policy, make_prompt=ref.make_prompt)
    try:
        assert pool.update_weights(other, 1) == []
        pool.submit(_samples(ref, tasks))
        assert pool.load == [2, 2]
        got = _drain(pool, 4)
    finally:
        pids = [p for c in pool.clients for p in c.pids]
        pool.close()
    assert len(pids) == 4 and _gone(pids, within=1.0)
    _assert_same(got, {s.group_id: s for s in ref.generate(_samples(ref, tasks))}, 1)


def _run(model_dir, out, mode):
    from glm5.rl.runner import run_rl

    # sync also offloads: every rank of the worker sleeps while the trainer runs (glm5.engine.sleep_mode), and the
    # weights it discarded come back from the push on both shards (the log-prob check below sees any that did not)
    cfg = RLConfig(model=str(model_dir), out=str(out), tasks=["arith"], n_train=32, n_eval=0, group_size=2,
                   manager={"mode": mode, "num_steps": 2, "groups_per_step": 2, "tau": 2 if mode == "async" else None,
                            "offload_rollout": mode == "sync"},
                   rollout={"max_new_tokens": 12}, trainer={"lr": 1e-3}, rollout_tp=2, max_model_len=256,
                   eval_before=False, eval_after=False, save=False, progress=False, train_threads=1,
                   rollout_threads=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 processes on a 2-core box: the oversubscription warning
        s = run_rl(cfg, handle_signals=False)
    return s, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_rl_runs_with_tp2_rollouts(model_dir, tmp_path, mode):
    """A short run with rollout_tp=2: every step trained, the rollout side on the pushed versions, and the
    trainer's log-probs of the rollouts equal to what the split engine reported (sync: same weights)."""
    s, recs = _run(model_dir, tmp_path / mode, mode)
    assert [r["step"] for r in recs] == [0, 1] and [r["rollout_version"] for r in recs] == [1, 2]
    for r in recs:
        assert all(map(lambda k: r[k] == r[k] and abs(r[k]) < 1e3, ("loss", "grad_norm", "reward", "entropy")))
        assert r["response_tokens"] > 0 and r["staleness_max"] <= (2 if mode == "async" else 0)
    if mode == "sync":
        assert all(r["logprob_gap_mean"] < 1e-3 for r in recs)
        assert recs[-1]["rollout_offload_s"] > 0
    assert s["run"]["final_version"] == 2 and s["rollout_stats"]["finished"] >= 8


# ------------------------------------------------------------------------------------------------ failures
_TRAINER = textwrap.dedent("""
    import json, sys
    import torch
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.rl.rollout import RolloutConfig
    from glm5.rl.rollout_client import ProcessRolloutClient
    from glm5.rl.rollout_worker import WorkerSpec
    from glm5.rl.sample import Sample

    if __name__ == "__main__":
        torch.set_num_threads(1)
        model_dir, busy = sys.argv[1], sys.argv[2] == "busy"
        spec = WorkerSpec(model_dir, RolloutConfig(max_new_tokens=200).to_dict(),
                          {"max_num_seqs": 16, "max_model_len": 256}, threads=1, tp=2)
        client = ProcessRolloutClient(spec, GLM5ForCausalLM.from_pretrained(model_dir))
        if busy:
            client.submit([Sample(prompt_ids=[5, 6, 7, 8], task={}, group_id=i, index=0, max_new_tokens=200)
                           for i in range(4)])
        print(json.dumps(client.pids), flush=True)
        import time
        time.sleep(600)
""")


@pytest.mark.parametrize("state", [pytest.param("idle", marks=pytest.mark.slow), "busy"])
def test_a_killed_trainer_leaves_no_rollout_process(model_dir, tmp_path, state):
    """SIGKILL the trainer (nothing can be sent from it): the driver and its follower exit within seconds,
    whether the driver was waiting for work or generating."""
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen([sys.executable, str(script), str(model_dir), state], stdout=subprocess.PIPE,
                               text=True, env=env)
    try:
        pids = json.loads(trainer.stdout.readline())
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        time.sleep(0.5 if state == "busy" else 0.0)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        assert _gone(pids, within=10.0), [p for p in pids if pid_alive(p)]
    finally:
        trainer.kill()
        trainer.wait()


@pytest.mark.parametrize("victim", [pytest.param("driver", marks=pytest.mark.slow), "follower"])
def test_a_killed_rank_ends_the_other_and_fails_the_client(model_dir, tok, tasks, victim):
    """SIGKILL one rank mid-generation. Rank 0 killed: the follower, blocked in a collective that will never
    complete, exits on its own. The follower killed: rank 0's next collective fails, it reports the error and
    exits. Either way the client's polls raise within seconds and close() still works."""
    policy = GLM5ForCausalLM.from_pretrained(model_dir)
    rcfg = RolloutConfig(max_new_tokens=200, temperature=1.0)
    spec = WorkerSpec(str(model_dir), rcfg.to_dict(), ENGINE, threads=1, tp=2)
    ref = RolloutEngine(build_engine(clone_model(policy), tok, max_num_seqs=1, max_model_len=256), tok, rcfg)
    client = ProcessRolloutClient(spec, policy, make_prompt=ref.make_prompt)
    try:
        client.submit(_samples(ref, tasks, budget=200))
        killed, other = (client.proc, client.followers[0])[::1 if victim == "driver" else -1]
        os.kill(killed.pid, signal.SIGKILL)
        assert _gone([other.pid], within=10.0)  # on its own, before any close()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rollout worker (died|failed)"):
            while time.monotonic() - t0 < 30:
                client.poll(0.05)
    finally:
        client.close()
    assert not any(p.is_alive() for p in (client.proc, *client.followers))
