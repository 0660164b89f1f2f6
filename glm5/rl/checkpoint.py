"""RL checkpoints: save every N steps, resume a killed or extended run where it stopped.

A checkpoint is the trainer's (``glm5.train.checkpoint.Checkpointer``: atomic ``out/checkpoints/step_*``, DCP model
and optimiser state, RNG) with the RL state in its ``trainer_state.json``:

* ``step`` (steps done) and the policy ``version`` (weight pushes are stamped with it, staleness counts from it);
* the data buffer's prompt order, cursor, group counter, shuffle RNG and counters: rollout seeds derive from the
  group ids, so a synchronous run resumed from step k reproduces the uninterrupted run's samples and weights;
* the evaluation before RL, so the final before/after comparison is still against the starting policy.

What is *not* kept, as in slime: groups open at the checkpoint (in flight, interrupted, or complete but not yet
trained; only asynchronous and one-step-off runs, or over-sampling, leave any). Their prompts were consumed and
are not revisited. The reference model of the KL term is the starting checkpoint (``--model``), not a
checkpoint's policy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glm5.train.checkpoint import Checkpointer, latest_checkpoint

# RLConfig fields a resumed run must share with the run that wrote the checkpoint: they decide which prompts and
# seeds the buffer's saved position refers to. Steps, learning rate, evaluation etc. may change (extending a run).
_SAME_ON_RESUME = ("model", "tasks", "tasks_file", "n_train", "unanswerable_frac", "seed", "group_size")


def _identity(cfg) -> dict:
    out = {k: getattr(cfg, k) for k in _SAME_ON_RESUME}
    out["model"] = os.path.realpath(out["model"])  # the same directory however it is spelled
    return out


class RLCheckpointer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.ckpt = Checkpointer(cfg.out, keep=cfg.keep_checkpoints)
        self.dir = self.ckpt.dir  # out/checkpoints

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this output directory, or None."""
        return latest_checkpoint(self.dir)

    def clear(self) -> bool:
        """Remove every checkpoint (a run that starts over); True when there were any."""
        if not self.dir.exists():
            return False
        shutil.rmtree(self.dir)
        return True

    def save(self, steps_done: int, trainer, buffer, extra: dict) -> Path:
        state = {"step": steps_done, "version": trainer.version, "buffer": buffer.state_dict(),
                 "identity": _identity(self.cfg), **extra}
        return self.ckpt.save(steps_done, trainer.model, trainer.optim, state)

    def check(self, path: Path) -> dict:
        """The saved state of the checkpoint at ``path`` (``step``, ``version``, ...), loading nothing; a checkpoint
        of another run is refused (ValueError)."""
        state = json.loads((path / "trainer_state.json").read_text())
        want, have = _identity(self.cfg), state.get("identity", {})
        diff = {k: (have.get(k), want[k]) for k in want if _norm(have.get(k)) != _norm(want[k])}
        if diff:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{path} was written by a different run ({detail}); "
                             f"use another --out, or --no-resume to start over")
        return state

    def resume(self, path: Path, trainer, buffer) -> dict:
        """Restore the checkpoint at ``path`` (policy, optimiser, RNG, version, buffer position) into ``trainer``
        and ``buffer``; returns its state. A checkpoint of another run is refused before anything is loaded."""
        self.check(path)
        state = self.ckpt.load(path, trainer.model, trainer.optim)
        trainer.version = int(state["version"])
        buffer.load_state_dict(state["buffer"])
        state["path"] = str(path)
        return state


def _norm(v):
    # JSON turns tuples into lists
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v
