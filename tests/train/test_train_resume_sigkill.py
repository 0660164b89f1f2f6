"""kill -9 in the middle of a checkpoint, resume, and get the uninterrupted loss curve back exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from glm5.train.checkpoint import latest_checkpoint

STEPS = 8


def _cmd(out, corpus_file, tok_dir, cache):
    return [sys.executable, "-m", "glm5.cli", "train", "--preset", "glm5-nano", "--data", str(corpus_file),
            "--tokenizer", str(tok_dir), "--cache-dir", str(cache), "--out", str(out), "--max-steps", str(STEPS),
            "--seq-len", "64", "--batch-size", "4", "--grad-accum", "2", "--mtp-depth", "2",
            "--seq-balance-alpha", "0.001", "--ckpt-every", "2", "--eval-every", "4", "--eval-batches", "2",
            "--threads", "1", "--no-progress", "--no-export", "--no-plot"]


def _curve(out):
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [(r["step"], r["loss"], r["ce"], r["mtp_steps"], r["grad_norm"], r["lr"], r["balance"]["layers"])
             for r in recs if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in recs if r["kind"] == "val"]
    return train, val


def test_sigkill_mid_checkpoint_then_resume_is_exact(tmp_path, corpus_file, small_tokenizer_dir):
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(ref, corpus_file, small_tokenizer_dir, cache), check=True, env=env, timeout=300,
                   capture_output=True)

    # Same run, but the save of step 6 stops after writing its files and before committing them: SIGKILL it.
    proc = subprocess.Popen(_cmd(run, corpus_file, small_tokenizer_dir, cache), env={**env, "GLM5_CKPT_PAUSE_AT_STEP": "6"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run / "checkpoints" / ".paused_00000006"
    deadline = time.time() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the run never reached the step-6 checkpoint")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    half = run / "checkpoints" / ".step_00000006.tmp"
    assert (half / "dcp").is_dir() and (half / "trainer_state.json").exists()  # fully written, never committed
    assert latest_checkpoint(run / "checkpoints").name == "step_00000004"
    killed_train, _ = _curve(run)
    assert killed_train[-1][0] == 6  # the killed run had logged steps 5 and 6 past the checkpoint

    subprocess.run(_cmd(run, corpus_file, small_tokenizer_dir, cache), check=True, env=env, timeout=300,
                   capture_output=True)
    assert not half.exists()  # cleaned by the next save
    assert latest_checkpoint(run / "checkpoints").name == f"step_{STEPS:08d}"
    ref_train, ref_val = _curve(ref)
    got_train, got_val = _curve(run)
    assert [s for s, *_ in got_train] == list(range(1, STEPS + 1))
    assert got_train == ref_train  # bit-identical losses, gradient norms, learning rates and expert loads
    assert got_val == ref_val
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000004")
