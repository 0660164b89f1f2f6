"""The clients the rollout manager drives: :class:`ProcessRolloutClient` starts the rollout process
(``glm5.rl.rollout_worker``) and talks to it over queues; :class:`LocalRolloutClient` has the same interface with
the :class:`~glm5.rl.rollout.RolloutEngine` in the caller's process. (``glm5.rl.rollout_pool`` puts several
behind the same interface; ``glm5.rl.ray_launcher`` has a Ray one.)
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable

from glm5.rl.rollout import RolloutEngine
from glm5.rl.rollout_tp import rollout_follower_main
from glm5.rl.rollout_worker import WorkerSpec, rollout_worker_main
from glm5.rl.sample import Sample

__all__ = ["LocalRolloutClient", "ProcessRolloutClient"]


class LocalRolloutClient:
    """The rollout engine in the caller's process (tests, ``--colocate``); same interface as the process client.
    ``poll`` drives the engine itself."""

    def __init__(self, rollout: RolloutEngine):
        self.rollout = rollout
        self.version = rollout.version
        self.busy_s = 0.0

    def make_prompt(self, task: dict) -> list[int]:
        return self.rollout.make_prompt(task)

    def submit(self, samples: list[Sample]) -> None:
        self.rollout.submit(samples)

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        t0 = time.perf_counter()
        done = self.rollout.take_done()
        if not done and self.rollout.has_work:
            done = self.rollout.step()
        self.busy_s += time.perf_counter() - t0
        return [("finished", done, {})] if done else []

    @property
    def has_work(self) -> bool:
        return self.rollout.has_work

    def abort(self) -> list[Sample]:
        return self.rollout.abort_all()

    def update_weights(self, model, version: int, abort: bool = True) -> list[Sample]:
        from glm5.rl.weight_sync import named_weights

        partial = self.rollout.abort_all()  # in-flight latents belong to the old weights
        self.rollout.load_weights(named_weights(model), version)
        self.version = version
        return partial

    def sleep(self, level: int = 1) -> None:
        """Release the engine's KV cache and offload (1) or discard (2) its weights while the trainer runs (slime's
        colocated mode; glm5/engine/sleep_mode.py). The engine must be idle."""
        self.rollout.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.rollout.engine.wake_up(tags)

    def stats(self) -> dict:
        return {**self.rollout.stats, "busy_s": self.busy_s}

    def close(self) -> None:
        pass


class ProcessRolloutClient:
    """Starts the rollout worker process and talks to it (manager side).

    Alone, a client owns its weight transport (a shared-memory copy of the weights, or a two-rank
    torch.distributed group). In a ``RolloutPool`` the pool owns one transport for all workers: it passes the
    shared ``shm`` (or ``wait=False`` to create one broadcast group after every worker has started) and pushes
    weights once for all of them.

    With ``spec.tp`` > 1 the worker is ``spec.tp`` processes (``glm5.rl.rollout_tp``): the worker this client
    talks to (rank 0) and its followers, all started here; each is a receiver of the weight transport."""

    def __init__(self, spec: WorkerSpec, policy_model=None, make_prompt: Callable | None = None,
                 start_timeout: float = 300.0, *, shm=None, wait: bool = True):
        import torch.multiprocessing as mp

        from glm5.rl.weight_sync import SharedMemoryWeightSync

        ctx = mp.get_context("spawn")
        if spec.weight_transport == "dist" and spec.dist.get("rank", 1) + spec.tp > spec.dist["world_size"]:
            raise ValueError(f"weight group of {spec.dist['world_size']} ranks has no room for this worker's "
                             f"{spec.tp} tensor-parallel rank(s) from rank {spec.dist.get('rank', 1)}")
        if spec.tp > 1 and not spec.tp_port:
            from glm5.rl.weight_sync import free_port

            spec = dataclasses.replace(spec, tp_port=free_port())
        self.spec = spec
        self.in_q, self.out_q = ctx.Queue(), ctx.Queue()
        self.shm = shm
        self.sender = None
        if spec.weight_transport == "shm" and self.shm is None:
            if policy_model is None:
                raise ValueError("shared-memory weight sync needs the policy model")
            self.shm = SharedMemoryWeightSync(policy_model, 0, ctx)
        self.proc = ctx.Process(target=rollout_worker_main, args=(spec, self.in_q, self.out_q, self.shm), daemon=True,
                                name="glm5-rollout")
        self.proc.start()
        self.followers = [ctx.Process(target=rollout_follower_main, args=(spec, r, self.proc.pid, self.shm),
                                      daemon=True, name=f"glm5-rollout-tp{r}") for r in range(1, spec.tp)]
        for f in self.followers:
            f.start()
        self._events: list[tuple] = []
        self.version = 0
        self._make_prompt = make_prompt
        self.last_stats: dict = {}
        if wait:
            if spec.weight_transport == "dist":
                from glm5.rl.weight_sync import DistWeightSender

                d = spec.dist
                self.sender = DistWeightSender(d["host"], d["port"], d["world_size"], d.get("backend", "gloo"))
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 300.0) -> None:
        first = self._get(timeout)
        if first[0] != "ready":
            raise RuntimeError(f"rollout worker failed to start: {first}")

    def _get(self, timeout: float | None):
        """Next event within ``timeout`` seconds (queue.Empty otherwise); fails fast if the worker died."""
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            try:
                ev = self.out_q.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                break
            except queue.Empty:
                if (dead := self._dead()) is not None:
                    try:  # its last words may still be in the queue
                        ev = self.out_q.get(timeout=0.5)
                        break
                    except queue.Empty:
                        raise RuntimeError(dead) from None
                if time.monotonic() >= deadline:
                    raise
        if ev[0] == "error":
            raise RuntimeError("rollout worker failed:\n" + ev[1])
        return ev

    def _dead(self) -> str | None:
        """Why the worker cannot go on (its process, or one of its tensor-parallel followers, has exited), or None."""
        if not self.proc.is_alive():
            return f"rollout worker died (exit code {self.proc.exitcode})"
        for r, f in enumerate(self.followers, 1):
            if not f.is_alive():
                return f"rollout worker died: its tensor-parallel rank {r} exited (exit code {f.exitcode})"
        return None

    def check_alive(self) -> None:
        """Raise if the worker process has died (its last words, if any, are in the next event)."""
        if (dead := self._dead()) is not None:
            try:
                self._events.append(self._get_nowait())
            except queue.Empty:
                raise RuntimeError(dead) from None

    @property
    def pids(self) -> list[int]:
        """Every process of this worker: rank 0, then its tensor-parallel followers."""
        return [p.pid for p in (self.proc, *self.followers)]

    def make_prompt(self, task: dict) -> list[int]:
        if self._make_prompt is None:
            raise RuntimeError("no prompt builder")
        return self._make_prompt(task)

    def submit(self, samples: list[Sample]) -> None:
        if samples:
            self.in_q.put(("submit", samples))

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        evs, self._events = self._events, []
        if not evs and timeout > 0:
            try:
                evs.append(self._get(timeout))
            except queue.Empty:
                pass
        while True:
            try:
                evs.append(self._get_nowait())
            except queue.Empty:
                break
        for ev in evs:
            if ev[0] == "finished" and ev[2]:
                self.last_stats.update(ev[2])
        return evs

    def _get_nowait(self):
        ev = self.out_q.get_nowait()
        if ev[0] == "error":
            raise RuntimeError("rollout worker failed:\n" + ev[1])
        return ev

    def _wait_for(self, kind: str, timeout: float = 600.0) -> tuple:
        deadline = time.monotonic() + timeout
        while True:
            ev = self._get(max(0.01, deadline - time.monotonic()))
            if ev[0] == kind:
                return ev
            self._events.append(ev)

    def abort(self) -> list[Sample]:
        self.request_abort()
        return self.await_abort()

    def request_abort(self) -> None:
        self.in_q.put(("abort",))

    def await_abort(self) -> list[Sample]:
        return self._wait_for("aborted")[1]

    def update_weights(self, model, version: int, abort: bool = True) -> list[Sample]:
        """Push weights with a version stamp; returns samples interrupted by the update."""
        if self.shm is not None:
            self.shm.push(model, version)
            self.request_weights(version, abort)
        else:  # the worker must be inside its receive before the broadcast starts
            self.request_weights(version, abort)
            self.sender.push(model, version)
        return self.await_weights(version)

    def request_weights(self, version: int, abort: bool = True) -> None:
        """Tell the worker to load ``version`` from the transport (pushed before, for shared memory)."""
        self.in_q.put(("weights", version, abort))

    def await_weights(self, version: int) -> list[Sample]:
        ev = self._wait_for("weights_loaded")
        if ev[1] != version:
            raise RuntimeError(f"rollout loaded version {ev[1]}, expected {version}")
        self.version = version
        return ev[2]

    def sleep(self, level: int = 1) -> None:
        """The worker's engine (every tensor-parallel rank) releases its KV cache and offloads (1) or discards (2)
        its weights, for a trainer on the same device; it must be idle (after ``abort``)."""
        self.in_q.put(("sleep", level))
        self._wait_for("slept")

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.in_q.put(("wake_up", tags))
        self._wait_for("woken")

    def stats(self) -> dict:
        self.in_q.put(("stats",))
        return self._wait_for("stats")[1]

    def close(self, timeout: float = 30.0) -> None:
        if self.proc.is_alive():
            self.in_q.put(("stop",))
            self.proc.join(timeout)
        # rank 0 released its followers when it stopped; any still running after that (rank 0 failed or was
        # killed) wait on a collective that will never complete
        deadline = time.monotonic() + 5.0
        for p in (self.proc, *self.followers):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
