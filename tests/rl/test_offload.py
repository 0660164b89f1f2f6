"""``offload_rollout``: in colocated sync RL the rollout engine sleeps while the trainer runs (slime's colocated mode),
and the run is otherwise exactly the run without it."""

import os

import pytest
import torch

from glm5.engine import build_engine
from glm5.rl.buffer import DataBuffer
from glm5.rl.manager import ManagerConfig, RolloutManager
from glm5.rl.rollout import RolloutConfig, RolloutEngine
from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.rollout_client import LocalRolloutClient, ProcessRolloutClient
from glm5.rl.rollout_worker import WorkerSpec
from glm5.rl.runner import RLConfig
from glm5.rl.trainer import RLTrainer, TrainerConfig
from glm5.rl.weight_sync import clone_model

from .test_manager import PLUGIN, run_cli


class WatchedClient(LocalRolloutClient):
    """Records each sleep level and what the engine held while the trainer ran."""

    def __init__(self, rollout):
        super().__init__(rollout)
        self.levels = []

    def sleep(self, level=1):
        self.levels.append(level)
        super().sleep(level)


class WatchedTrainer(RLTrainer):
    """Calls ``probe()`` at the start of every training step and keeps what it returns in ``seen``."""

    def __init__(self, policy, cfg, probe):
        super().__init__(policy, cfg)
        self.probe, self.seen = probe, []

    def train_step(self, batch):
        self.seen.append(self.probe())
        return super().train_step(batch)


def engine_state(client):
    eng = client.rollout.engine
    return eng.is_sleeping(), eng.kv_cache.nbytes(), sum(p.numel() for p in eng.model.parameters())


def run(policy, tok, tasks, plugin_fn, offload: bool, push_interval: int = 1):
    torch.manual_seed(0)
    ro = RolloutEngine(build_engine(clone_model(policy), tok, max_num_seqs=32, max_model_len=256), tok,
                       RolloutConfig(max_new_tokens=12, reward=plugin_fn))
    client = WatchedClient(ro)
    buf = DataBuffer(tasks, ro.make_prompt, 4, 12)
    trainer = WatchedTrainer(clone_model(policy), TrainerConfig(lr=1e-3), lambda: engine_state(client))
    mgr = RolloutManager(client, trainer, buf, ManagerConfig(mode="sync", num_steps=4, groups_per_step=2,
                                                             push_interval=push_interval, offload_rollout=offload))
    mgr.run()
    return mgr, client, trainer


@pytest.fixture(scope="module")
def plugin_fn(tmp_path_factory):
    p = tmp_path_factory.mktemp("plugin") / "rl_offload_rewards.py"
    p.write_text(PLUGIN)
    return f"{p}:parity_reward"


def test_offloaded_run_equals_the_plain_run_and_sleeps_while_training(policy, tok, tasks, plugin_fn):
    plain, pc, ptr = run(policy, tok, tasks, plugin_fn, offload=False)
    off, oc, otr = run(policy, tok, tasks, plugin_fn, offload=True, push_interval=1)
    # asleep during every training step: no KV cache, and level 2 (a push follows) left no weights on the engine
    assert oc.levels == [2, 2, 2, 2]
    assert all(s and kv == 0 and w == 0 for s, kv, w in otr.seen)
    assert all(not s and kv > 0 and w > 0 for s, kv, w in ptr.seen)
    assert not oc.rollout.engine.is_sleeping()
    # the same samples, rewards and updates: sleeping changed nothing but memory
    for a, b in zip(plain.records, off.records):
        for key in ("reward", "pg_loss", "logprob_gap_mean", "ratio_mean", "rollout_version"):
            assert a[key] == b[key], key
    for (n, p), (_, q) in zip(ptr.model.named_parameters(), otr.model.named_parameters()):
        assert torch.equal(p, q), n
    assert off.records[-1]["rollout_offload_s"] > 0 and plain.records[-1]["rollout_offload_s"] == 0


def test_steps_without_a_push_keep_the_weights(policy, tok, tasks, plugin_fn):
    # push every 2 steps: the weights are offloaded (level 1) when no new ones follow, discarded (level 2) otherwise
    off, oc, _ = run(policy, tok, tasks, plugin_fn, offload=True, push_interval=2)
    assert oc.levels == [1, 2, 1, 2]
    plain, _, _ = run(policy, tok, tasks, plugin_fn, offload=False, push_interval=2)
    assert [r["reward"] for r in off.records] == [r["reward"] for r in plain.records]


def test_offload_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="mode 'sync'"):
        ManagerConfig(mode="async", offload_rollout=True)
    for placement in ("colocate", "process", "ray"):
        RLConfig(model="m", manager=ManagerConfig(mode="sync", offload_rollout=True), placement=placement)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_rollout_process_gives_its_memory_back_while_the_trainer_runs(model_dir, tok, tasks, plugin_fn):
    # a trainer sharing the device with a rollout process (slime's colocation): the worker's 256 MiB cache and its
    # weights leave its address space during training, and the next rollouts run on the pushed weights
    policy = GLM5ForCausalLM.from_pretrained(model_dir)
    rcfg = RolloutConfig(max_new_tokens=12, reward=plugin_fn)
    spec = WorkerSpec(str(model_dir), rcfg.to_dict(), {"max_num_seqs": 16, "max_model_len": 256,
                                                       "kv_cache_memory": 256 << 20}, threads=1)
    ro_local = RolloutEngine(build_engine(clone_model(policy), tok, max_num_seqs=1, max_model_len=256), tok, rcfg)
    client = ProcessRolloutClient(spec, policy, make_prompt=ro_local.make_prompt)
    before_sleep = []
    sleep = client.sleep
    client.sleep = lambda level: (before_sleep.append(_rss(client.proc.pid)), sleep(level))
    try:
        buf = DataBuffer(tasks, client.make_prompt, 4, 12)
        tr = WatchedTrainer(policy, TrainerConfig(lr=1e-3), lambda: _rss(client.proc.pid))
        mgr = RolloutManager(client, tr, buf, ManagerConfig(mode="sync", num_steps=3, groups_per_step=2,
                                                            offload_rollout=True))
        mgr.run()
    finally:
        client.close()
    # each step: the worker's resident memory just before it slept, against while the trainer ran. Not the whole
    # 256 MiB every time: glibc keeps some freed heap pages (the asleep RSS varies by ~50 MiB from cycle to cycle)
    assert len(before_sleep) == len(tr.seen) == 3
    assert all(a - b > 128 << 20 for a, b in zip(before_sleep, tr.seen)), (before_sleep, tr.seen)
    assert [r["rollout_version"] for r in mgr.records] == [1, 2, 3]
    assert all(r["logprob_gap_mean"] < 1e-4 for r in mgr.records)  # each rollout ran on the weights pushed to it


def test_cli_flag(model_dir, tmp_path):
    import json

    out = tmp_path / "run"
    assert run_cli(model_dir, out, "--placement", "colocate", "--mode", "sync", "--offload-rollout", "--n-eval", "4",
                   "--no-save") == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[-1]["rollout_offload_s"] > 0 and recs[-1]["rollout_version"] == 2
    assert run_cli(model_dir, tmp_path / "bad", "--placement", "colocate", "--mode", "async", "--offload-rollout",
                   "--no-eval") != 0


def test_rollout_kv_cache_memory_caps_the_engine(model_dir, tok):
    # on a GPU shared with the trainer, what each wake-up takes back is the user's to set (slime's mem fraction)
    import argparse

    from glm5.rl.cli import add_parser, config_from_args
    from glm5.rl.runner import make_client

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    a = p.parse_args(["rl", "--model", str(model_dir), "--placement", "colocate", "--offload-rollout",
                      "--rollout-kv-cache-memory", "24MiB", "--max-model-len", "256"])
    cfg = config_from_args(a)
    assert cfg.rollout_kv_cache_memory == 24 << 20 and cfg.manager.offload_rollout
    client = make_client(cfg, GLM5ForCausalLM.from_pretrained(model_dir), tok, 1)
    kv = client.rollout.engine.kv_cache
    size = kv.nbytes()
    assert 12 << 20 < size <= 24 << 20
    client.sleep(2)
    assert kv.nbytes() == 0
    client.wake_up(["kv_cache"])
    assert kv.nbytes() == size  # the same budget after waking
    with pytest.raises(SystemExit):
        p.parse_args(["rl", "--model", "m", "--rollout-kv-cache-memory", "lots"])
    with pytest.raises(ValueError, match="positive number of bytes"):
        RLConfig(model="m", rollout_kv_cache_memory=0)
