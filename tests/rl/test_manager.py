"""The manager's three schedules on the real engine and trainer, the rollout process, and ``glm5 rl`` end to end."""

import json

import pytest
import torch

from glm5.engine import build_engine
from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.buffer import DataBuffer
from glm5.rl.manager import ManagerConfig, RolloutManager
from glm5.rl.rollout import RolloutConfig, RolloutEngine
from glm5.rl.rollout_client import LocalRolloutClient, ProcessRolloutClient
from glm5.rl.rollout_worker import WorkerSpec
from glm5.rl.trainer import RLTrainer, TrainerConfig
from glm5.rl.weight_sync import clone_model

PLUGIN = '''
def parity_reward(response, task):
    """Some signal for a random policy: +1 for an even number of characters, -1 otherwise."""
    return 1.0 if len(response) % 2 == 0 else -1.0

def half_constant(response, task):
    """Zero variance for every other task (dynamic sampling must drop those groups)."""
    if int(task["id"].rsplit("-", 1)[1]) % 2 == 0:
        return 0.0
    return float(len(response) % 3)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    p = tmp_path_factory.mktemp("plugin") / "rl_test_rewards.py"
    p.write_text(PLUGIN)
    return str(p)


def local_setup(policy, tok, tasks, plugin_fn, *, tau=None, dynamic=False, partial=False, G=4, max_new=16):
    ro = RolloutEngine(build_engine(clone_model(policy), tok, max_num_seqs=32, max_model_len=256), tok,
                       RolloutConfig(max_new_tokens=max_new, reward=plugin_fn))
    client = LocalRolloutClient(ro)
    buf = DataBuffer(tasks, ro.make_prompt, G, max_new, tau=tau, dynamic_sampling=dynamic, partial_rollout=partial)
    return client, buf, RLTrainer(policy, TrainerConfig(lr=1e-3))


def test_sync_mode_is_on_policy(policy, tok, tasks, plugin):
    client, buf, tr = local_setup(policy, tok, tasks, plugin + ":parity_reward")
    mgr = RolloutManager(client, tr, buf, ManagerConfig(mode="sync", num_steps=3, groups_per_step=2))
    summary = mgr.run()
    assert summary["trained_samples"] == 24 and summary["final_version"] == 3 and client.version == 3
    recs = mgr.records
    assert [r["version"] for r in recs] == [1, 2, 3] and [r["rollout_version"] for r in recs] == [1, 2, 3]
    assert all(r["staleness_max"] == 0 for r in recs) and recs[-1]["staleness_hist"] == {0: 24}
    # on-policy every step: engine and trainer log-probs agree, ratio exactly 1 before each update
    assert all(r["logprob_gap_mean"] < 1e-4 and r["ratio_mean"] == 1.0 for r in recs)
    for key in ("reward", "accuracy", "abstention_rate", "hallucination_rate", "samples_per_s", "trainer_idle_s",
                "trainer_idle_frac", "generated_samples_per_s", "pg_loss", "entropy", "clipfrac", "grad_norm"):
        assert key in recs[-1], key
    assert summary["trainer_idle_s"] > 0 and summary["samples_per_s"] > 0


@pytest.mark.parametrize("mode", ["processed_logprobs", "raw_logprobs"])
def test_rollout_log_probs_match_the_trainer_at_temperature_0_7(policy, tok, tasks, plugin, mode):
    """The rollout engine reports the distribution it sampled from (processed_logprobs, what build_rollout_engine
    sets), so at T != 1 the first step is on-policy to rounding; the model's raw distribution would not be."""
    ro = RolloutEngine(build_engine(clone_model(policy), tok, max_num_seqs=32, max_model_len=256, logprobs_mode=mode),
                       tok, RolloutConfig(max_new_tokens=16, reward=plugin + ":parity_reward", temperature=0.7))
    buf = DataBuffer(tasks, ro.make_prompt, 4, 16)
    tr = RLTrainer(policy, TrainerConfig(lr=1e-3, temperature=0.7))
    mgr = RolloutManager(LocalRolloutClient(ro), tr, buf, ManagerConfig(mode="sync", num_steps=1, groups_per_step=2))
    mgr.run()
    gap = mgr.records[0]["logprob_gap_mean"]
    assert gap < 1e-4 if mode == "processed_logprobs" else gap > 1e-2, gap


def test_fp8_kv_cache_rollouts_are_nearly_on_policy(policy, tok, tasks, plugin):
    """Rollouts that read an FP8 KV cache: the trainer's log-probs differ from the rollout's by the cache's rounding,
    more than the fp32 cache's (< 1e-4) but little; the importance ratio stays near 1."""
    from glm5.rl.runner import RLConfig, _engine_kwargs

    ek = _engine_kwargs(RLConfig(model="m", rollout_kv_cache_dtype="fp8", max_model_len=256, max_num_seqs=32))
    assert ek["kv_cache_dtype"] == "fp8"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        RLConfig(model="m", rollout_kv_cache_dtype="int4")
    ro = RolloutEngine(build_engine(clone_model(policy), tok, logprobs_mode="processed_logprobs", **ek), tok,
                       RolloutConfig(max_new_tokens=16, reward=plugin + ":parity_reward"))
    buf = DataBuffer(tasks, ro.make_prompt, 4, 16)
    mgr = RolloutManager(LocalRolloutClient(ro), RLTrainer(policy, TrainerConfig(lr=1e-3)), buf,
                         ManagerConfig(mode="sync", num_steps=1, groups_per_step=2))
    mgr.run()
    gap = mgr.records[0]["logprob_gap_mean"]
    assert 1e-5 < gap < 5e-2, gap  # measured 0.011


def test_rollout_spec_disable_batch_size_reaches_every_engine(model_dir, tok, monkeypatch):
    """--rollout-spec-disable-batch-size goes into the engine arguments every placement builds its engines from: the
    colocated engine's config, and the spec a rollout process (with its tensor-parallel ranks) or a Ray actor builds
    its engine from."""
    import argparse

    import glm5.rl.ray_launcher as ray_launcher
    from glm5.rl import runner
    from glm5.rl.cli import add_parser, config_from_args
    from glm5.rl.rollout_tp import tp_engine_kwargs

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    argv = ["rl", "--model", str(model_dir), "--rollout-spec-tokens", "2", "--rollout-spec-disable-batch-size", "4",
            "--max-model-len", "256"]
    cfg = config_from_args(p.parse_args(argv + ["--placement", "colocate"]))
    assert cfg.rollout_spec_disable_batch_size == 4
    eng = runner.make_client(cfg, GLM5ForCausalLM.from_pretrained(model_dir), tok, 1).rollout.engine
    assert eng.config.spec_disable_batch_size == 4 and eng.config.num_speculative_tokens == 2
    specs = []
    monkeypatch.setattr(runner, "ProcessRolloutClient", lambda spec, *a, **kw: specs.append(spec))
    monkeypatch.setattr(ray_launcher, "RayRolloutClient", lambda spec, **kw: specs.append(spec))
    for extra in (["--placement", "process"], ["--placement", "process", "--rollout-tp", "2"], ["--placement", "ray"]):
        runner.make_client(config_from_args(p.parse_args(argv + extra)), None, tok, 1)
    assert len(specs) == 3 and all(tp_engine_kwargs(s)["spec_disable_batch_size"] == 4 for s in specs)
    assert tp_engine_kwargs(specs[1])["tensor_parallel_size"] == 2
    with pytest.raises(ValueError, match="rollout_spec_disable_batch_size"):
        runner.RLConfig(model="m", rollout_spec_disable_batch_size=-1)


def test_one_step_off_trains_one_version_behind(policy, tok, tasks, plugin):
    client, buf, tr = local_setup(policy, tok, tasks, plugin + ":parity_reward")
    mgr = RolloutManager(client, tr, buf, ManagerConfig(mode="one-step-off", num_steps=3, groups_per_step=2))
    mgr.run()
    assert [r["staleness_max"] for r in mgr.records] == [0, 1, 1]
    assert mgr.records[-1]["staleness_hist"] == {0: 8, 1: 16}
    assert mgr.records[0]["logprob_gap_mean"] < 1e-4  # first step: same weights on both sides
    assert mgr.records[1]["logprob_gap_mean"] > 1e-4  # later: the trainer has moved on by one update


def test_dynamic_sampling_keeps_only_informative_groups(policy, tok, tasks, plugin):
    client, buf, tr = local_setup(policy, tok, tasks, plugin + ":half_constant", dynamic=True)
    mgr = RolloutManager(client, tr, buf, ManagerConfig(mode="sync", num_steps=2, groups_per_step=2))
    mgr.run()
    assert buf.stats.dropped_zero_std_groups > 0
    assert mgr.records[-1]["dropped_zero_std_groups"] == buf.stats.dropped_zero_std_groups
    assert all(r["train_samples"] == 8 for r in mgr.records)
    assert all(r["advantage_abs_mean"] > 0 for r in mgr.records)


def test_async_mode_with_rollout_process(model_dir, tok, tasks, plugin):
    """The rollout engine in its own process, weights through shared memory, staleness bound τ = 1."""
    policy = GLM5ForCausalLM.from_pretrained(model_dir)
    rcfg = RolloutConfig(max_new_tokens=24, reward=plugin + ":parity_reward")
    spec = WorkerSpec(str(model_dir), rcfg.to_dict(), {"max_num_seqs": 32, "max_model_len": 256}, threads=1)
    ro_local = RolloutEngine(build_engine(clone_model(policy), tok, max_num_seqs=1, max_model_len=256), tok, rcfg)
    client = ProcessRolloutClient(spec, policy, make_prompt=ro_local.make_prompt)
    try:
        buf = DataBuffer(tasks, client.make_prompt, 4, 24, tau=1, partial_rollout=True)
        tr = RLTrainer(policy, TrainerConfig(lr=1e-3))
        mgr = RolloutManager(client, tr, buf, ManagerConfig(mode="async", num_steps=4, groups_per_step=2, tau=1,
                                                            max_inflight_groups=4))
        summary = mgr.run()
        stats = client.stats()
    finally:
        client.close()
    assert not client.proc.is_alive()
    assert summary["final_version"] == 4 and client.version == 4
    assert all(r["staleness_max"] <= 1 for r in mgr.records)
    assert set(summary["buffer"]["staleness_hist"]) <= {0, 1}
    assert mgr.records[0]["logprob_gap_mean"] < 1e-4
    assert summary["generated_samples"] >= summary["trained_samples"] == 32
    assert stats["finished"] >= 32 and stats["requests"] >= 32


def run_cli(model_dir, out, *extra: str) -> int:
    """``glm5 rl`` on the test policy: 2 steps of 2 groups × 2 arithmetic rollouts, one thread a side."""
    from glm5.cli import main

    return main(["rl", "--model", str(model_dir), "--out", str(out), "--task", "arith", "--n-train", "32",
                 "--steps", "2", "--groups", "2", "--group-size", "2", "--max-new-tokens", "12",
                 "--max-model-len", "256", "--no-progress", "--train-threads", "1", "--rollout-threads", "1", *extra])


def test_cli_end_to_end(model_dir, tmp_path):
    out = tmp_path / "run"
    rc = run_cli(model_dir, out, "--n-eval", "8", "--placement", "colocate", "--mode", "async", "--lr", "1e-3",
                 "--loss", "ddis", "--eval-sampled", "2")
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["run"]["steps"] == 2 and "before" in s and "after" in s and "delta" in s
    assert s["after_sampled"]["samples_per_task"] == 2 and "accuracy_delta_ci" in s["delta_sampled"]
    assert len(s["before"]["per_task"]["correct"]) == 8
    assert {"accuracy", "accuracy_ci", "hallucination_rate", "abstention_rate"} <= set(s["after"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["step"] == 1
    assert (out / "rl.png").stat().st_size > 1000
    GLM5ForCausalLM.from_pretrained(out / "hf")  # the trained policy is a normal checkpoint


def test_cli_speculative_rollouts_with_online_mtp_training(model_dir, tmp_path):
    # slime's speculative rollouts: the rollout engine drafts with the MTP layer, which the trainer keeps training
    # online; acceptance is reported per step, and the pushed / saved weights carry the trained MTP layer.
    out = tmp_path / "run"
    rc = run_cli(model_dir, out, "--n-eval", "4", "--placement", "colocate", "--mode", "sync", "--lr", "1e-3",
                 "--rollout-spec-tokens", "2", "--mtp-weight", "0.5", "--mtp-depth", "2")
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        assert 1.0 <= r["spec_acceptance_length"] <= 3.0 and r["mtp_kl"] > 0 and r["mtp_grad_norm"] > 0
    n_main = GLM5ForCausalLM.from_pretrained(model_dir).config.num_hidden_layers
    before = GLM5ForCausalLM.from_pretrained(model_dir).state_dict()
    after = GLM5ForCausalLM.from_pretrained(out / "hf").state_dict()
    mtp = [k for k in before if k.startswith(f"model.layers.{n_main}.") and ".indexer." not in k]
    assert any(not torch.equal(before[k], after[k]) for k in mtp)


def test_cli_process_placement_with_distributed_weight_sync(model_dir, tmp_path):
    out = tmp_path / "run"
    rc = run_cli(model_dir, out, "--mode", "one-step-off", "--weight-sync", "dist", "--no-eval", "--no-save")
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_version"] for r in recs] == [1, 2]
    assert recs[-1]["staleness_hist"] == {"0": 4, "1": 4}
