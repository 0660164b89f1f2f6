"""The rollout manager: one loop, three schedules (slime's ``train.py`` / ``train_async.py`` / fully async).

The three modes differ only in where the loop waits:

* ``sync`` (on-policy): generate batch k with weights v_k, train on it (-> v_{k+1}), push, repeat. The
  trainer idles during generation and the rollout engine idles during training. Samples have staleness 0.
* ``one-step-off``: while the trainer trains on batch k, the rollout process generates batch k+1 with v_k; the
  manager waits for batch k+1 to finish before pushing v_{k+1} (no generation is in flight during a weight
  update). From step 1 on, every sample is exactly one version stale.
* ``async``: the rollout process generates continuously, kept busy under AReaL-style admission control
  (groups admitted so far ≤ (τ + v + 1)·B + dropped, and at most ``max_inflight_groups`` open groups); the
  trainer takes B finished groups whenever they are ready. A weight push interrupts in-flight generations, which
  come back to the buffer as partial rollouts and resume on the new weights (their ``weight_versions`` record
  both versions). Samples whose oldest version is more than τ behind are dropped and counted.

Per step the manager logs rollout metrics of the trained batch (reward, accuracy, abstention, hallucination),
trainer metrics (loss terms, clip fractions, log-prob gap, importance ratio), and system metrics: trained
samples/s, generated samples/s, trainer idle time (waiting for data or for the weight sync), staleness mean and
histogram, drops by reason.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

from glm5.rl.buffer import DataBuffer
from glm5.rl.metrics import MetricsLogger, rollout_metrics
from glm5.rl.sample import Status

__all__ = ["ManagerConfig", "RolloutManager", "MODES", "RolloutStalledError"]


class RolloutStalledError(RuntimeError):
    """Groups keep coming back unusable (every sample failed, all rewards equal under dynamic sampling, or too
    stale), so no training batch can ever fill: the run stops instead of generating forever."""

MODES = ("sync", "one-step-off", "async")


@dataclass
class ManagerConfig:
    mode: str = "sync"
    num_steps: int = 10
    groups_per_step: int = 4  # B: prompts per training batch
    tau: int | None = None  # staleness bound (versions); None = no bound
    max_inflight_groups: int = 8  # async: open groups at most
    over_sampling: int = 0  # sync / one-step-off: extra groups submitted per batch (APRIL-style, aborted at the end)
    push_interval: int = 1  # push weights every this many train steps
    poll_timeout: float = 0.02
    max_wait_s: float = 3600.0  # give up if no batch arrives for this long
    # stop (RolloutStalledError) after this many finished groups in a row were all dropped (None: 10 batches'
    # worth, at least 64; 0: never). Groups whose every sample failed stop the run sooner: after 2 batches' worth
    # (at least 8), since a reward function or environment that fails that consistently is broken.
    max_dropped_in_a_row: int | None = None
    # sync: put the rollout engine to sleep while the trainer runs (its KV cache released; weights discarded when
    # this step pushes new ones, else offloaded), as slime's colocated mode does. Needs a client with sleep/wake_up.
    offload_rollout: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.tau is not None and self.tau < 0:
            raise ValueError("tau must be >= 0")
        if self.num_steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.num_steps}")
        if self.groups_per_step < 1:
            raise ValueError(f"groups per step must be >= 1, got {self.groups_per_step}")
        if self.push_interval < 1:
            raise ValueError(f"push_interval must be >= 1, got {self.push_interval}")
        if self.max_inflight_groups < 1:
            raise ValueError(f"max_inflight_groups must be >= 1, got {self.max_inflight_groups}")
        if self.over_sampling < 0:
            raise ValueError(f"over_sampling must be >= 0, got {self.over_sampling}")
        if self.max_dropped_in_a_row is not None and self.max_dropped_in_a_row < 0:
            raise ValueError(f"max_dropped_in_a_row must be >= 0, got {self.max_dropped_in_a_row}")
        if self.offload_rollout and self.mode != "sync":
            raise ValueError(f"offload_rollout needs mode 'sync': in {self.mode!r} mode generation stays in flight "
                             f"while the trainer runs, so the engine cannot give its memory up")
        if self.mode == "one-step-off" and self.tau == 0:
            raise ValueError("one-step-off trains every batch one version behind (staleness 1): tau 0 would drop "
                             "them all; use tau >= 1 (or no bound), or mode sync")

    def to_dict(self) -> dict:
        return asdict(self)


class RolloutManager:
    """Drives a rollout client (LocalRolloutClient / ProcessRolloutClient / Ray), a DataBuffer and an RLTrainer."""

    def __init__(self, client, trainer, buffer: DataBuffer, cfg: ManagerConfig, logger: MetricsLogger | None = None,
                 on_step=None, should_stop=None):
        self.client = client
        self.trainer = trainer
        self.buffer = buffer
        self.cfg = cfg
        self.logger = logger
        self.on_step = on_step  # callback(step, record) (evaluation, checkpoints)
        self.should_stop = should_stop  # () -> bool, asked after each step (and its on_step): end the run there
        self.stopped = False  # the run ended early at should_stop's request
        self.inflight = 0  # samples submitted and not yet back
        self.generated = 0
        self.generated_tokens = 0
        self.trained = 0
        self.trainer_wait_s = 0.0
        self.offload_s = 0.0  # offload_rollout: time spent putting the engine to sleep and waking it
        self.sync_s = 0.0
        self.records: list[dict] = []
        self._t0 = None
        self._failure_reasons: set[str] = set()  # warned about once each

    # ------------------------------------------------------------------------------------- events
    def _handle(self, events) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "finished":
                for s in ev[1]:
                    self.inflight -= 1
                    self.generated += 1
                    self.generated_tokens += s.response_length
                    if s.status == Status.FAILED:
                        self._warn_failure(s)
                    self.buffer.add_finished(s)
            elif kind == "aborted":
                self._return_partial(ev[1])
            elif kind == "weights_loaded":
                self._return_partial(ev[2])
        self._check_stalled()

    def _warn_failure(self, s) -> None:
        reason = s.failure_reason or "unknown failure"
        if reason not in self._failure_reasons and len(self._failure_reasons) < 5:
            self._failure_reasons.add(reason)
            warnings.warn(f"a rollout sample failed ({reason}); failed samples are never trained on (their group is "
                          "padded or dropped, see dropped_failed_groups)", stacklevel=3)

    def _check_stalled(self) -> None:
        b = self.buffer
        B = self.cfg.groups_per_step
        limit = self.cfg.max_dropped_in_a_row
        if limit is None:
            limit = max(64, 10 * B)
        streak = b.dropped_in_a_row
        failed = b.drop_streak.get("failed", 0)
        if failed == streak and failed >= max(8, 2 * B) and limit:
            limit = min(limit, failed)
        if not limit or streak < limit:
            return
        parts = [f"{n} {why}" for why, n in sorted(b.drop_streak.items()) if n]
        hints = []
        if b.drop_streak.get("failed"):
            hints.append(f"last failure: {b.last_failure}")
        if b.drop_streak.get("zero reward variance"):
            vals = sorted(b.zero_variance_rewards)
            hints.append(f"every sample of those groups got the same reward ({', '.join(f'{v:g}' for v in vals)}): "
                         "the tasks are too hard or too easy for this policy, or the reward is constant; "
                         "try other tasks or run without --dynamic-sampling")
        if b.drop_streak.get("stale"):
            hints.append("raise --tau or lower --max-inflight-groups")
        raise RolloutStalledError(f"{streak} groups in a row were dropped ({', '.join(parts)}) and none was kept, so "
                                  f"no training batch can fill; " + "; ".join(hints))

    def _return_partial(self, samples) -> None:
        for s in samples:
            self.inflight -= 1
            self.buffer.add_partial(s)

    def _submit(self, new_groups: int | None, max_samples: int = 1 << 30) -> int:
        work = self.buffer.get_work(max_samples, rollout_id=self.trainer.version, new_groups=new_groups)
        if work:
            self.inflight += len(work)
            self.client.submit(work)
        return len(work)

    @property
    def _open_groups(self) -> int:
        return len(self.buffer._outstanding)

    def _dropped_groups(self) -> int:
        st = self.buffer.stats
        return (st.dropped_zero_std_groups + st.dropped_stale_groups + st.dropped_failed_groups
                + st.dropped_at_resume_groups)

    # ------------------------------------------------------------------------------------- collect
    def _wait_for_batch(self, B: int, top_up) -> list:
        """Handle rollout events until B groups are ready, calling ``top_up()`` (submit more groups) before each
        poll; the wait counts as trainer idle time. A rollout side silent for ``max_wait_s`` is an error."""
        t0 = last_progress = time.perf_counter()
        while (batch := self.buffer.pop_batch(B, self.trainer.version)) is None:
            top_up()
            evs = self.client.poll(self.cfg.poll_timeout)
            if evs:
                last_progress = time.perf_counter()
                self._handle(evs)
            elif time.perf_counter() - last_progress > self.cfg.max_wait_s:
                raise TimeoutError(f"no rollout progress for {self.cfg.max_wait_s:.0f}s")
        self.trainer_wait_s += time.perf_counter() - t0
        return batch

    def _collect(self, B: int, keep_generating: bool) -> list:
        """Block until B groups are ready (topping up submissions as groups are filtered out); with
        ``keep_generating=False`` leftover in-flight samples are interrupted and returned to the buffer."""
        def top_up():
            need = B - self.buffer.num_ready - self._open_groups + self.cfg.over_sampling
            if need > 0 or self.buffer.num_resumable:
                self._submit(max(need, 0))

        batch = self._wait_for_batch(B, top_up)
        if not keep_generating and self.inflight > 0:
            t0 = time.perf_counter()
            self._return_partial(self.client.abort())
            self._handle(self.client.poll(0))
            self.trainer_wait_s += time.perf_counter() - t0
        return batch

    def _async_admit(self) -> None:
        B = self.cfg.groups_per_step
        room = self.cfg.max_inflight_groups - self._open_groups
        if self.cfg.tau is not None:
            produced = self.buffer.stats.groups_submitted - self._dropped_groups()
            room = min(room, (self.cfg.tau + self.trainer.version + 1) * B - produced)
        if room > 0 or self.buffer.num_resumable:
            self._submit(max(room, 0))

    # ---------------------------------------------------------------------------------------- push
    def _push(self) -> None:
        t0 = time.perf_counter()
        partial = self.client.update_weights(self.trainer.model, self.trainer.version,
                                             abort=self.cfg.mode == "async")
        self._return_partial(partial)
        self.trainer.after_push()
        dt = time.perf_counter() - t0
        self.sync_s += dt
        self.trainer_wait_s += dt

    def _offload(self, fn, arg) -> None:
        t0 = time.perf_counter()
        fn(arg)
        self.offload_s += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ run
    def _train(self, step: int, batch: list, t_step: float) -> dict:
        samples = [s for g in batch for s in g]
        stale = [s.staleness(self.trainer.version) for s in samples]
        roll = rollout_metrics(samples)
        met = self.trainer.train_step(batch)
        self.trained += len(samples)
        rec = {"step": step, "mode": self.cfg.mode, **roll, **met,
               "staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale)}
        return rec

    def _finish_record(self, rec: dict, t_step: float) -> dict:
        el = time.perf_counter() - self._t0
        st = self.buffer.stats.to_dict()
        rec.update({
            "elapsed_s": el, "step_time_s": time.perf_counter() - t_step,
            "samples_per_s": self.trained / el, "generated_samples_per_s": self.generated / el,
            "generated_tokens_per_s": self.generated_tokens / el,
            "trainer_idle_s": self.trainer_wait_s, "trainer_idle_frac": self.trainer_wait_s / el,
            "weight_sync_s": self.sync_s, "rollout_offload_s": self.offload_s,
            "trained_samples": self.trained, "generated_samples": self.generated,
            "inflight": self.inflight, "staleness_hist": st["staleness_hist"],
            "dropped_stale_groups": st["dropped_stale_groups"], "dropped_stale_samples": st["dropped_stale_samples"],
            "dropped_zero_std_groups": st["dropped_zero_std_groups"], "dropped_failed_groups": st["dropped_failed_groups"],
            "dropped_at_resume_groups": st["dropped_at_resume_groups"],
            "resumed_samples": st["samples_resumed"], "restarted_samples": st["samples_restarted"],
            "rollout_version": getattr(self.client, "version", None),
        })
        self.records.append(rec)
        if self.logger is not None:
            self.logger.log(rec)
        if self.on_step is not None:
            self.on_step(rec["step"], rec)
        return rec

    def _stop_requested(self) -> bool:
        self.stopped = self.should_stop is not None and bool(self.should_stop())
        return self.stopped

    def run(self, start_step: int = 0) -> dict:
        """Steps ``start_step`` .. ``num_steps - 1`` (a resumed run starts past 0), or fewer when ``should_stop``
        says so after a step (then ``stopped`` is set and no generation is left in flight)."""
        cfg = self.cfg
        B = cfg.groups_per_step
        self._t0 = time.perf_counter()
        steps = range(start_step, cfg.num_steps)
        if not steps:
            return self.summary()
        if cfg.mode == "sync":
            for step in steps:
                t = time.perf_counter()
                batch = self._collect(B, keep_generating=False)
                push = (step + 1) % cfg.push_interval == 0 or step + 1 == cfg.num_steps
                if cfg.offload_rollout:  # the engine is idle now: its memory is the trainer's until the push
                    self._offload(self.client.sleep, 2 if push else 1)  # weights about to be replaced: not kept
                rec = self._train(step, batch, t)
                if cfg.offload_rollout:
                    self._offload(self.client.wake_up, ["weights"])  # slime's order: weights, update, KV cache
                if push:
                    self._push()
                if cfg.offload_rollout:
                    self._offload(self.client.wake_up, ["kv_cache"])
                self._finish_record(rec, t)
                if self._stop_requested():
                    break
        elif cfg.mode == "one-step-off":
            batch = self._collect(B, keep_generating=False)
            for step in steps:
                t = time.perf_counter()
                last = step + 1 == cfg.num_steps
                if not last:  # generate batch k+1 with v_k while training on batch k
                    self._submit(B + cfg.over_sampling)
                rec = self._train(step, batch, t)
                if not last:
                    batch = self._collect(B, keep_generating=False)
                if (step + 1) % cfg.push_interval == 0 or last:
                    self._push()
                self._finish_record(rec, t)
                if self._stop_requested():  # the batch collected for the next step is dropped, as at a checkpoint
                    break
        else:
            for step in steps:
                t = time.perf_counter()
                batch = self._wait_for_batch(B, self._async_admit)
                self._async_admit()  # keep the rollout side busy while training
                rec = self._train(step, batch, t)
                self._handle(self.client.poll(0))
                if (step + 1) % cfg.push_interval == 0 or step + 1 == cfg.num_steps:
                    self._push()
                self._async_admit()
                self._finish_record(rec, t)
                if self._stop_requested():
                    break
        if self.inflight > 0:  # async generation (or an early stop): interrupt what is still running
            self._return_partial(self.client.abort())
        return self.summary()

    def summary(self) -> dict:
        el = time.perf_counter() - self._t0 if self._t0 else 0.0
        return {"mode": self.cfg.mode, "steps": len(self.records), "elapsed_s": el,
                "trained_samples": self.trained, "generated_samples": self.generated,
                "samples_per_s": self.trained / el if el else 0.0,
                "generated_samples_per_s": self.generated / el if el else 0.0,
                "trainer_idle_s": self.trainer_wait_s, "trainer_idle_frac": self.trainer_wait_s / el if el else 0.0,
                "weight_sync_s": self.sync_s, "final_version": self.trainer.version,
                "buffer": self.buffer.stats.to_dict()}
