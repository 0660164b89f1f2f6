"""Optional Ray placement (``pip install glm5[ray]``): the rollout worker as a Ray actor, on another GPU or machine.

The single-box default uses plain processes (glm5.rl.rollout_client.ProcessRolloutClient); this module is only
imported with ``--placement ray`` and fails with a clear message when Ray is missing.

:class:`RayRolloutClient` has the rollout-client interface the manager drives (submit / poll / abort /
update_weights / stats / close). The actor runs the same :func:`rollout_worker_main` loop as the rollout process,
in a background thread with in-actor queues; the actor's methods (``put``, ``get_events``) move messages
(``max_concurrency=4`` lets them run while the loop generates). Samples travel through Ray's object store.
Weights always go through a dedicated torch.distributed group (gloo, or NCCL between GPUs): the driver is rank 0
and the actor rank 1, rendezvousing on the driver's address, so the actor may live on any node of the cluster.
Resources: ``num_gpus`` for the actor (e.g. 1 to place the engine on its own GPU; the trainer keeps the driver's
device), ``resources`` for custom node labels.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

__all__ = ["RayRolloutClient", "ray_available"]


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        return True
    except ImportError:
        return False


def _require_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("--placement ray needs Ray: pip install 'glm5[ray]' (or pip install ray)") from e
    return ray


class _RolloutActorImpl:
    """The body of the Ray actor (a plain class so it can be tested without Ray)."""

    def __init__(self, spec):
        from glm5.rl.rollout_worker import rollout_worker_main

        self.in_q: queue.Queue = queue.Queue()
        self.out_q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=rollout_worker_main, args=(spec, self.in_q, self.out_q, None),
                                       daemon=True, name="glm5-rollout")
        self.thread.start()

    def put(self, msg) -> None:
        self.in_q.put(msg)

    def get_events(self, timeout: float = 0.0, max_events: int = 1000) -> list:
        evs = []
        try:
            evs.append(self.out_q.get(timeout=timeout) if timeout > 0 else self.out_q.get_nowait())
        except queue.Empty:
            return evs
        while len(evs) < max_events:
            try:
                evs.append(self.out_q.get_nowait())
            except queue.Empty:
                break
        return evs

    def alive(self) -> bool:
        return self.thread.is_alive()

    def node_ip(self) -> str:
        return socket.gethostbyname(socket.gethostname())


class RayRolloutClient:
    def __init__(self, spec, make_prompt=None, address: str | None = None, num_gpus: float = 0.0,
                 num_cpus: float = 1.0, resources: dict | None = None, start_timeout: float = 600.0,
                 driver_host: str | None = None):
        if getattr(spec, "tp", 1) > 1:  # the actor runs the worker loop in a thread: it has no followers to drive
            raise ValueError(f"a Ray rollout actor runs one engine process; rollout_tp={spec.tp} needs placement "
                             "'process'")
        ray = _require_ray()
        import os

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            kw = {"address": address} if address else {"num_cpus": max(2, os.cpu_count() or 2),
                                                        "include_dashboard": False}
            ray.init(ignore_reinit_error=True, log_to_driver=True, **kw)
        self.ray = ray
        from glm5.rl.weight_sync import DistWeightSender, free_port

        spec.weight_transport = "dist"
        host = driver_host or ("127.0.0.1" if not address else ray.util.get_node_ip_address())
        spec.dist = {"host": host, "port": free_port(), "rank": 1, "world_size": 2,
                     "backend": spec.dist.get("backend", "gloo") if spec.dist else "gloo"}
        actor_cls = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, resources=resources or {},
                               max_concurrency=4)(_RolloutActorImpl)
        self.actor = actor_cls.remote(spec)
        # rank 0 (the driver) must join the rendezvous while the actor does
        self.sender = DistWeightSender(spec.dist["host"], spec.dist["port"], 2, spec.dist["backend"])
        self._events: list = []
        deadline = time.monotonic() + start_timeout
        while True:
            evs = self._fetch(1.0)
            ready = [e for e in evs if e[0] == "ready"]
            self._events.extend(e for e in evs if e[0] != "ready")
            if ready:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("rollout actor did not start")
        self._make_prompt = make_prompt
        self.version = 0

    def _fetch(self, timeout: float) -> list:
        evs = self.ray.get(self.actor.get_events.remote(timeout))
        for e in evs:
            if e[0] == "error":
                raise RuntimeError("rollout actor failed:\n" + e[1])
        return evs

    def make_prompt(self, task):
        return self._make_prompt(task)

    def submit(self, samples) -> None:
        if samples:
            self.actor.put.remote(("submit", samples))

    def poll(self, timeout: float = 0.0) -> list:
        evs, self._events = self._events, []
        evs += self._fetch(timeout if not evs else 0.0)
        return evs

    def _wait_for(self, kind: str, timeout: float = 600.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, e in enumerate(evs := self._fetch(0.5)):
                if e[0] == kind:
                    self._events.extend(evs[:i] + evs[i + 1:])
                    return e
            self._events.extend(evs)
        raise TimeoutError(f"no {kind!r} from the rollout actor")

    def abort(self):
        self.actor.put.remote(("abort",))
        return self._wait_for("aborted")[1]

    def update_weights(self, model, version: int, abort: bool = True):
        self.ray.get(self.actor.put.remote(("weights", version, abort)))
        self.sender.push(model, version)
        ev = self._wait_for("weights_loaded")
        self.version = version
        return ev[2]

    def sleep(self, level: int = 1) -> None:
        """offload_rollout: the actor's engine releases its memory until ``wake_up`` (it must be idle)."""
        self.actor.put.remote(("sleep", level))
        self._wait_for("slept")

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.actor.put.remote(("wake_up", tags))
        self._wait_for("woken")

    def stats(self) -> dict:
        self.actor.put.remote(("stats",))
        return self._wait_for("stats")[1]

    def close(self) -> None:
        try:
            self.ray.get(self.actor.put.remote(("stop",)), timeout=30)
            self._wait_for("stopped", timeout=30)
        except Exception:
            pass
        try:
            self.ray.kill(self.actor)
        except Exception:
            pass
