"""SIGTERM (a scheduler's preemption notice; Ctrl-C goes the same way) stops ``glm5 rl`` after the step in
progress: a checkpoint is saved even without --save-every, the rollout process is stopped (no leftover process),
the exit status is 143, and the same command resumes from the checkpoint. A rerun with nothing left to train
says so in one line and exits 0."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_manager import run_cli

# run_cli's arguments (its --steps is overridden by a later one) and this test's
BASE = ("--task", "arith", "--n-train", "32", "--groups", "2", "--group-size", "2", "--max-new-tokens", "12",
        "--max-model-len", "256", "--no-progress", "--train-threads", "1", "--rollout-threads", "1")
RUN = ("--no-eval", "--lr", "3e-3", "--mode", "async", "--no-save")


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _steps(out: Path) -> list[int]:
    try:
        return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.timeout(180)
def test_sigterm_checkpoints_stops_the_rollout_process_and_resumes(model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "glm5.cli", "rl", "--model", str(model_dir), "--out", str(out), *BASE, *RUN,
           "--placement", "process", "--steps", "50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not _steps(out) or _steps(out)[-1] < 1:  # two steps done, the rollout process generating ahead
        if proc.poll() is not None:
            pytest.fail(f"glm5 rl exited early: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "no RL step within 120 s"
        time.sleep(0.05)
    children = _descendants(proc.pid)
    assert children  # the rollout worker (and multiprocessing's resource tracker)
    # to every process of the group, as Slurm signals every process of a job (and a terminal's Ctrl-C its
    # foreground group): the rollout process must outlive it until the trainer has finished its step
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, err[-3000:]
    k = int(lines[0].split(" at step ")[1].split(":")[0])
    ckpt = out / "checkpoints" / f"step_{k:08d}"
    assert lines[0] == f"interrupted by SIGTERM at step {k}: checkpoint saved to {ckpt}; run the same command to resume"
    assert "Traceback" not in err and 2 <= k < 50
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == k and state["version"] == k
    assert _steps(out) == list(range(k))
    deadline = time.monotonic() + 15
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [c for c in children if _alive(c)]
    for c in left:
        os.kill(c, signal.SIGKILL)
    assert not left, "the rollout process outlived glm5 rl"

    # the same run, one step further, continues from the checkpoint (here with the engine in-process)
    assert run_cli(model_dir, out, *RUN, "--placement", "colocate", "--steps", str(k + 1)) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_from"] == str(ckpt) and s["run"]["steps"] == 1 and s["run"]["final_version"] == k + 1
    assert s["steps_done"] == k + 1 and _steps(out) == list(range(k + 1))
    # a resumed run ends with a checkpoint, so that rerunning it finds nothing left to do
    assert (out / "checkpoints" / f"step_{k + 1:08d}" / "trainer_state.json").exists()


def test_a_rerun_at_or_below_the_checkpoint_says_nothing_to_train(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    sync = ("--placement", "colocate", "--mode", "sync", "--no-eval", "--save-every", "1")
    assert run_cli(model_dir, out, *sync, "--steps", "2") == 0
    capsys.readouterr()
    mtime = (out / "summary.json").stat().st_mtime_ns
    for steps in ("2", "1"):  # the finished run again, and fewer steps than it holds
        assert run_cli(model_dir, out, *sync, "--steps", steps) == 0
        cap = capsys.readouterr()
        assert cap.err.strip().splitlines() == [f"{out} already holds step 2 >= --steps {steps}: nothing to train; "
                                                "raise --steps, or pass --no-resume / a new --out"]
        assert cap.out == ""
    assert (out / "summary.json").stat().st_mtime_ns == mtime and _steps(out) == [0, 1]


def test_a_run_stopped_after_its_last_step_still_finishes_on_rerun(model_dir, tmp_path, capsys):
    """A checkpoint at --steps without a finished summary (the run was stopped or killed after its last step):
    the rerun trains nothing but evaluates and exports, as the stopped run would have."""
    out = tmp_path / "run"
    sync = ("--placement", "colocate", "--mode", "sync", "--no-eval", "--save-every", "1")
    assert run_cli(model_dir, out, *sync, "--steps", "1", "--no-save") == 0
    (out / "summary.json").unlink()
    assert run_cli(model_dir, out, *sync, "--steps", "1") == 0
    s = json.loads((out / "summary.json").read_text())
    assert "nothing to train" not in capsys.readouterr().err
    assert s["resumed_from"].endswith("step_00000001") and s["run"]["steps"] == 0 and s["steps_done"] == 1
    assert (out / "hf" / "config.json").exists()
