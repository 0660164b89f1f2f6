"""Ctrl-C / SIGTERM stop a run gracefully: the step finishes, a checkpoint is saved, the exit status is 130 / 143,
and the same command resumes to the uninterrupted loss curve exactly. A second Ctrl-C stops at once. A rerun with
nothing left to train says so."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from glm5.train.checkpoint import latest_checkpoint
from glm5.train.interrupt import GracefulStop, Interrupted, agreed_signal

from .test_train_resume_sigkill import STEPS, _cmd, _curve


def _wait_for_step(proc, out, step, timeout=120):
    """Until ``out/metrics.jsonl`` has a train record of ``step`` or later."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        try:
            train, _ = _curve(out)
        except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half written
            train = []
        if train and train[-1][0] >= step:
            return
        time.sleep(0.02)


def test_sigint_saves_a_checkpoint_and_the_same_command_resumes_exactly(tmp_path, corpus_file, small_tokenizer_dir):
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(ref, corpus_file, small_tokenizer_dir, cache), check=True, env=env, timeout=300,
                   capture_output=True)
    # no periodic checkpoints in the interrupted run: the one it leaves is the one the interrupt wrote
    cmd = _cmd(run, corpus_file, small_tokenizer_dir, cache) + ["--ckpt-every", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, err[-2000:]
    step = int(lines[0].split(" at step ")[1].split(":")[0])
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    assert lines[0] == (f"interrupted by SIGINT at step {step}: checkpoint saved to {ckpt}; "
                        "run the same command to resume")
    assert "Traceback" not in err and 2 <= step < STEPS
    assert latest_checkpoint(run / "checkpoints") == ckpt  # complete (trainer_state.json is written last)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert _curve(run)[0][-1][0] == step  # the step in progress was finished and logged, no further one
    assert not (run / "summary.json").exists() and not (run / "hf").exists()

    r = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {ckpt} (step {step})" in r.stderr
    ref_train, ref_val = _curve(ref)
    got_train, got_val = _curve(run)
    assert [s for s, *_ in got_train] == list(range(1, STEPS + 1))
    assert got_train == ref_train  # bit-identical losses, gradient norms, learning rates and expert loads
    assert got_val == ref_val

    # the same command once more: nothing to train, one line, exit 0, nothing rewritten
    mtime = (run / "summary.json").stat().st_mtime_ns
    r = subprocess.run(cmd + ["--max-steps", str(STEPS - 2)], env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.splitlines()[-1] == (f"{run} already holds step {STEPS} >= --max-steps {STEPS - 2}: nothing to "
                                         "train; raise --max-steps, or pass --no-resume / a new --out")
    assert r.stdout == "" and (run / "summary.json").stat().st_mtime_ns == mtime


def test_a_run_stopped_after_its_last_step_finishes_on_rerun_then_has_nothing_to_train(tmp_path, corpus_file,
                                                                                        small_tokenizer_dir):
    """A checkpoint at --max-steps without the run's summary (stopped or killed after the last step): the rerun
    validates, exports and writes the summary; only a rerun after that has nothing to train."""
    from glm5.train.config import TrainConfig
    from glm5.train.trainer import Trainer

    cfg = TrainConfig(preset="glm5-nano", data=[str(corpus_file)], tokenizer=str(small_tokenizer_dir),
                      cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), max_steps=2, seq_len=64,
                      batch_size=2, eval_every=0, eval_batches=1, ckpt_every=0, threads=1, progress=False,
                      plot=False)
    t = Trainer(cfg)
    try:
        t.train_step()
        t.train_step()
        t.save_checkpoint()
    finally:
        t.close()
    t = Trainer(cfg)
    try:
        assert t.nothing_to_train() is None
        s = t.fit()
    finally:
        t.close()
    assert "nothing_to_train" not in s and s["steps"] == 2 and (tmp_path / "run" / "hf" / "config.json").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from"].endswith("step_00000002")
    t = Trainer(cfg)
    try:
        s = t.fit()
    finally:
        t.close()
    assert s["nothing_to_train"].startswith(f"{tmp_path / 'run'} already holds step 2 >= --max-steps 2")


def test_torchrun_ranks_stop_after_the_same_step_when_one_gets_sigterm(tmp_path, corpus_file, small_tokenizer_dir):
    """Only rank 1 is signalled (a preempted node, say): the flag is all-reduced at each step boundary, so rank 0
    stops after the same step, both write their shards of one checkpoint and exit 143; nobody hangs in a
    collective. (torchrun itself then reports its workers' non-zero exit.)"""
    out = tmp_path / "run"
    cmd = _cmd(out, corpus_file, small_tokenizer_dir, tmp_path / "cache") + ["--ckpt-every", "0", "--max-steps", "50",
                                                                            "--batch-size", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", *cmd[2:]]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, out, 1)
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        env = dict(e.split(b"=", 1) for e in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in e)
        ranks[int(env[b"RANK"])] = int(pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun's verdict on workers that exit 143
    # torchrun reports the first worker to exit 143; it may then stop the other itself (both orders were seen), so
    # that both ranks stopped after the same step is shown by the checkpoint holding both ranks' files
    assert "exitcode  : 143" in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted by SIGTERM at step ")]
    assert len(lines) == 1, err[-3000:]  # rank 0 reports
    step = int(lines[0].split(" at step ")[1].split(":")[0])
    ckpt = latest_checkpoint(out / "checkpoints")
    assert 1 <= step < 50 and ckpt.name == f"step_{step:08d}"
    assert {p.name for p in ckpt.glob("rank*.pt")} == {"rank0.pt", "rank1.pt"}
    assert {p.name for p in (ckpt / "dcp").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert _curve(out)[0][-1][0] == step


# ------------------------------------------------------------------------------------------- GracefulStop
def test_first_signal_is_recorded_and_a_second_sigint_raises_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop(repeat_window=0.0, announce=False) as stop:
        assert stop.installed
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert stop.signum == signal.SIGINT
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert time.monotonic() - t0 < 1.0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_repeat_within_the_window_is_the_same_request_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop(repeat_window=60.0, announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # e.g. torchrun forwarding what the terminal sent: no KeyboardInterrupt
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM and agreed_signal(stop.signum) == signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert agreed_signal(None) is None


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def body():
        with GracefulStop() as stop:
            seen.append((stop.installed, signal.getsignal(signal.SIGINT)))

    th = threading.Thread(target=body)
    th.start()
    th.join()
    assert seen == [(False, before)]


def test_interrupted_exit_codes_and_message():
    e = Interrupted(signal.SIGTERM, 37, "runs/x/checkpoints/step_00000037")
    assert isinstance(e, KeyboardInterrupt) and e.exit_code == 143
    assert Interrupted(signal.SIGINT, 1, "d").exit_code == 130
    assert str(e) == ("interrupted by SIGTERM at step 37: checkpoint saved to runs/x/checkpoints/step_00000037; "
                      "run the same command to resume")
