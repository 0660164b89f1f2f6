"""What a first-time ``glm5 rl`` user runs into: bad inputs give one clear line (not a traceback or a hang), a
broken reward function or an impossible filter stops the run with the reason, the log-prob gap is measured before
the update, and a killed trainer does not leave its rollout worker behind."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from glm5.engine import build_engine
from glm5.rl.buffer import DataBuffer
from glm5.rl.manager import ManagerConfig, RolloutManager, RolloutStalledError
from glm5.rl.rollout import RolloutConfig, RolloutEngine
from glm5.rl.rollout_client import LocalRolloutClient
from glm5.rl.tasks import load_tasks
from glm5.rl.trainer import RLTrainer, TrainerConfig
from glm5.rl.weight_sync import clone_model

from .test_manager import run_cli
from .test_trainer import make_groups

REWARDS = '''
def boom(response, task):
    raise RuntimeError("the grader is down")

def words(response, task):
    return "correct"

def nothing(response, task):
    return None

def constant(response, task):
    return -1.0
'''


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    p = tmp_path_factory.mktemp("rewards") / "first_use_rewards.py"
    p.write_text(REWARDS)
    return str(p)


def _manager(policy, tok, tasks, reward, *, mode="sync", dynamic=False, tau=None, max_model_len=256, **mc):
    ro = RolloutEngine(build_engine(clone_model(policy), tok, max_num_seqs=16, max_model_len=max_model_len), tok,
                       RolloutConfig(max_new_tokens=6, reward=reward))
    buf = DataBuffer(tasks, ro.make_prompt, 2, 6, tau=tau, dynamic_sampling=dynamic)
    cfg = ManagerConfig(mode=mode, num_steps=2, groups_per_step=2, tau=tau, max_wait_s=60, **mc)
    return RolloutManager(LocalRolloutClient(ro), RLTrainer(policy, TrainerConfig(lr=1e-3)), buf, cfg), buf


@pytest.mark.parametrize("fn", ["boom", "words", "nothing"])
def test_a_broken_reward_function_stops_the_run_with_its_reason(policy, tok, tasks, rewards, fn):
    # before: every sample FAILED silently, every group was dropped, and the manager generated forever
    mgr, buf = _manager(policy, tok, tasks, f"{rewards}:{fn}")
    with pytest.warns(UserWarning, match="a rollout sample failed"), pytest.raises(RolloutStalledError) as e:
        mgr.run()
    assert re.search(r"\d+ failed\)", str(e.value)) and "last failure: reward:" in str(e.value)
    assert buf.stats.dropped_failed_groups >= 8 and mgr.trainer.version == 0


def test_dynamic_sampling_with_a_constant_reward_stops_instead_of_spinning(policy, tok, tasks, rewards):
    mgr, buf = _manager(policy, tok, tasks, f"{rewards}:constant", dynamic=True, max_dropped_in_a_row=5)
    with pytest.raises(RolloutStalledError, match=r"\d+ zero reward variance.*same reward \(-1\)"):
        mgr.run()
    assert buf.stats.dropped_zero_std_groups >= 5


def test_a_prompt_longer_than_the_context_fails_its_samples(policy, tok, tasks):
    # before: the sample "finished" TRUNCATED with an empty response and was trained on (reward -1, no tokens)
    mgr, _ = _manager(policy, tok, tasks, "abstention", max_model_len=8)
    with pytest.warns(UserWarning, match="leaves no room to generate under max_model_len 8"), \
            pytest.raises(RolloutStalledError, match="failed"):
        mgr.run()


@pytest.mark.parametrize("kw,msg", [({"push_interval": 0}, "push_interval"), ({"groups_per_step": 0}, "groups"),
                                    ({"num_steps": -1}, "steps"), ({"max_inflight_groups": 0}, "inflight"),
                                    ({"mode": "one-step-off", "tau": 0}, "tau 0 would drop them all")])
def test_manager_config_rejects_what_cannot_run(kw, msg):
    # before: push_interval 0 was a ZeroDivisionError, groups 0 an "empty batch" error after the rollout process
    # started, and one-step-off with tau 0 dropped every batch forever
    with pytest.raises(ValueError, match=msg):
        ManagerConfig(**kw)


def test_logprob_gap_is_measured_before_the_update(policy):
    # with several mini-batches the later ones used to see the already-updated policy: a "gap" of 0.07 at step 0
    tr = RLTrainer(policy, TrainerConfig(lr=1e-2, updates_per_batch=3))
    m = tr.train_step(make_groups(tr, policy.config.vocab_size))
    assert m["logprob_gap_mean"] < 1e-5 and m["logprob_gap_max"] < 1e-4
    tr = RLTrainer(policy, TrainerConfig(lr=1e-2, updates_per_batch=3, old_logp="rollout"))
    m = tr.train_step(make_groups(tr, policy.config.vocab_size, seed=1))
    assert m["logprob_gap_mean"] < 1e-5 and m["logprob_gap_max"] < 1e-4


def test_task_files_are_checked_line_by_line(tmp_path):
    p = tmp_path / "t.jsonl"
    cases = [('{"question": "1 + 1?", "answer": 2}\n{"prompt": "2 + 2?", "answer": 4}\n', r"t.jsonl:2: .*'question'"),
             ('{"question": "1 + 1?"}\n', r"t.jsonl:1: an answerable task needs an 'answer'"),
             ('{"question": "1 + 1?", "answer": 2}\n{bad\n', r"t.jsonl:2: invalid JSON"),
             ('[1, 2]\n', "must be a JSON object"), ("\n", "no tasks")]
    for text, msg in cases:
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_tasks(p)
    p.write_text('{"question": "1 + 1?", "answer": 2}\n\n{"question": "Who?", "answerable": false}\n')
    assert [t["question"] for t in load_tasks(p)] == ["1 + 1?", "Who?"]


@pytest.mark.parametrize("args,msg", [
    (["--reward", "no_such_module_xyz:f"], "no module named 'no_such_module_xyz'"),
    (["--reward", "nosuch"], "not a built-in"),
    (["--tools", "browser"], "unknown tool 'browser'"),
    (["--push-interval", "0"], "push_interval must be >= 1"),
    (["--groups", "0"], "groups per step must be >= 1"),
    (["--unanswerable-frac", "1.5"], "unanswerable_frac"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--mode", "one-step-off", "--tau", "0"], "tau 0"),
    (["--top-p", "0.9", "--is-mask"], "--is-mask compare the trainer's log-probs"),
    (["--top-p", "0.9", "--loss", "ddis"], "--loss ddis"),
])
def test_cli_bad_inputs_are_one_line_errors(model_dir, tmp_path, capsys, args, msg):
    out = tmp_path / "run"
    assert run_cli(model_dir, out, "--no-eval", *args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was written


def test_cli_missing_model_and_a_broken_reward_at_run_time(model_dir, tmp_path, capsys, rewards):
    assert run_cli(tmp_path / "nope", tmp_path / "a", "--no-eval") == 2
    assert "no such directory" in capsys.readouterr().err
    # a reward function that raises on every sample: a one-line error with its message (it used to hang)
    rc = run_cli(model_dir, tmp_path / "b", "--no-eval", "--placement", "colocate", "--reward", f"{rewards}:boom")
    err = capsys.readouterr().err
    assert rc == 2 and "the grader is down" in err.splitlines()[-1] and "Traceback" not in err


def test_rollout_worker_exits_when_the_trainer_is_killed(model_dir, tmp_path):
    # before: after a SIGKILL of `glm5 rl` its rollout process waited on its queue forever (holding the model)
    code = textwrap.dedent(f"""
        import sys, time
        from glm5.model.transformer import GLM5ForCausalLM
        from glm5.rl.rollout import RolloutConfig
        from glm5.rl.rollout_client import ProcessRolloutClient
        from glm5.rl.rollout_worker import WorkerSpec
        policy = GLM5ForCausalLM.from_pretrained({str(model_dir)!r})
        spec = WorkerSpec({str(model_dir)!r}, RolloutConfig().to_dict(), {{"max_model_len": 64}}, threads=1)
        client = ProcessRolloutClient(spec, policy)
        print(client.proc.pid, flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker = int(p.stdout.readline())
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_help_documents_every_option():
    from glm5.cli import build_parser

    sub = build_parser("rl")._subparsers._group_actions[0].choices["rl"]
    assert [a.option_strings for a in sub._actions if not a.help] == []


def test_eval_line_says_na_for_rates_with_nothing_to_count():
    from glm5.rl.cli import _fmt

    m = {"accuracy": 0.0, "accuracy_ci": [0.0, 0.4], "abstention_rate": 0.0, "hallucination_rate": 0.0,
         "hallucination_rate_ci": [0.0, 0.0], "unanswerable_abstention_rate": 0.0, "reward": -1.0,
         "n_answered": 0, "n_unanswerable": 0}
    line = _fmt(m)
    assert "hallucination n/a" in line and "unanswerable" not in line
    line = _fmt({**m, "n_answered": 3, "hallucination_rate": 1.0, "hallucination_rate_ci": [0.4, 1.0],
                 "n_unanswerable": 2})
    assert "hallucination 1.000 [0.400, 1.000]" in line and "unanswerable→IDK 0.000" in line


def test_eval_tasks_file_is_used_with_generated_training_tasks(model_dir, tmp_path):
    # before: --eval-tasks-file without --tasks-file was silently ignored (the generated held-out set was used)
    ev = tmp_path / "eval.jsonl"
    ev.write_text('{"question": "Calculate 2 + 2.", "answer": "4"}\n{"question": "Who am I?", "answerable": false}\n')
    out = tmp_path / "run"
    assert run_cli(model_dir, out, "--placement", "colocate", "--steps", "1", "--no-save", "--n-eval", "8",
                   "--eval-tasks-file", str(ev)) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["before"]["n"] == 2 and s["before"]["n_unanswerable"] == 1
