"""Rollout data parallelism: several rollout engines behind the one client interface the manager drives.

slime scales generation by running several SGLang engines behind a router and broadcasting each new policy
to all of them. ``RolloutPool`` does the same with our rollout workers: each is its own process with its own
engine; whole groups go to the least-loaded worker (a group's samples share a prompt, so they share its
prefix-cache blocks on one engine); events from every worker are merged; a weight push is written once (one
shared-memory copy, or one torch.distributed broadcast group of rank 0 = trainer and ranks 1..N = workers)
and every worker acknowledges it before the next push, so no worker reads a half-written version.

The manager cannot tell a pool from a single client: ``submit``, ``poll``, ``abort``, ``update_weights``,
``stats``, ``close``, ``make_prompt`` and ``version`` behave the same.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Callable

from glm5.rl.rollout_tp import worker_devices
from glm5.rl.sample import Sample

__all__ = ["RolloutPool", "launch_process_pool"]


class RolloutPool:
    """N rollout clients used as one. ``shm`` / ``sender``: the pool-wide weight transport when the clients
    share one (process workers from ``launch_process_pool``); without one each client pushes its own weights."""

    def __init__(self, clients: list, *, shm=None, sender=None):
        if not clients:
            raise ValueError("a rollout pool needs at least one client")
        self.clients = list(clients)
        self.shm = shm
        self.sender = sender
        self.load = [0] * len(self.clients)  # samples submitted to each worker and not yet back
        self.version = getattr(self.clients[0], "version", 0)

    def make_prompt(self, task: dict) -> list[int]:
        return self.clients[0].make_prompt(task)

    # --------------------------------------------------------------------------------------- work
    def submit(self, samples: list[Sample]) -> None:
        groups: dict = defaultdict(list)
        for s in samples:
            groups[s.group_id].append(s)
        per_client: dict[int, list[Sample]] = defaultdict(list)
        for group in groups.values():
            i = min(range(len(self.clients)), key=lambda j: self.load[j])
            per_client[i].extend(group)
            self.load[i] += len(group)
        for i, work in per_client.items():
            self.clients[i].submit(work)

    # where each event that hands samples back carries them (see glm5.rl.rollout_worker.rollout_worker_main)
    _SAMPLES_AT = {"finished": 1, "aborted": 1, "weights_loaded": 2}

    def _account(self, i: int, events: list[tuple]) -> None:
        for ev in events:
            if ev[0] in self._SAMPLES_AT:
                self.load[i] -= len(ev[self._SAMPLES_AT[ev[0]]])

    def _collect(self, get) -> list[Sample]:
        """``get(client)`` -> the samples it hands back (aborted or interrupted by a weight update), pooled."""
        out: list[Sample] = []
        for i, c in enumerate(self.clients):
            got = get(c)
            self.load[i] -= len(got)
            out.extend(got)
        return out

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        """Events of every worker; waits up to ``timeout`` seconds for the first one."""
        deadline = time.monotonic() + timeout
        while True:
            out: list[tuple] = []
            for i, c in enumerate(self.clients):
                evs = c.poll(0)
                self._account(i, evs)
                out.extend(evs)
            if not out:  # a silent pool may be a dead worker: fail now, not after the manager's long timeout
                for i, c in enumerate(self.clients):
                    if hasattr(c, "check_alive"):
                        try:
                            c.check_alive()
                        except RuntimeError as e:
                            raise RuntimeError(f"rollout worker {i} of {len(self.clients)}: {e}") from None
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            time.sleep(min(remaining, 0.002))

    @property
    def has_work(self) -> bool:
        return any(n > 0 for n in self.load)

    def abort(self) -> list[Sample]:
        for c in self.clients:
            if hasattr(c, "request_abort"):
                c.request_abort()  # every worker stops at once, then their samples are collected
        return self._collect(lambda c: c.await_abort() if hasattr(c, "request_abort") else c.abort())

    # ------------------------------------------------------------------------------------ weights
    def update_weights(self, model, version: int, abort: bool = True) -> list[Sample]:
        """Push ``version`` to every worker; returns the samples the update interrupted (partial rollouts)."""
        if self.shm is None and self.sender is None:  # each client owns its transport
            partial = self._collect(lambda c: c.update_weights(model, version, abort=abort))
        else:
            if self.shm is not None:
                self.shm.push(model, version)  # written once, read by every worker
            for c in self.clients:
                c.request_weights(version, abort)
            if self.sender is not None:  # every worker is now inside its receive
                self.sender.push(model, version)
            partial = self._collect(lambda c: c.await_weights(version))
        self.version = version
        return partial

    # ----------------------------------------------------------------------------------- the rest
    def sleep(self, level: int = 1) -> None:
        for c in self.clients:  # each waits for its worker's reply: a worker that fails raises here
            c.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        for c in self.clients:
            c.wake_up(tags)

    def stats(self) -> dict:
        per = [c.stats() for c in self.clients]
        merged: dict = {"workers": per, "num_workers": len(per)}
        for d in per:
            for k, v in d.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    merged[k] = merged.get(k, 0) + v
        return merged

    def close(self) -> None:
        errors = []
        for c in self.clients:
            try:
                c.close()
            except Exception as e:  # close every worker even if one fails
                errors.append(e)
        if errors:
            raise errors[0]


def launch_process_pool(spec, n: int, policy_model=None, make_prompt: Callable | None = None,
                        start_timeout: float = 300.0) -> RolloutPool:
    """Start ``n`` rollout worker processes from one ``WorkerSpec`` with a pool-wide weight transport. For
    ``spec.weight_transport == "dist"``, ``spec.dist`` names the trainer's host/port; worker i gets rank i + 1
    of an (n + 1)-rank group. With ``spec.tp`` > 1 each worker is a tensor-parallel group of ``spec.tp``
    processes, every one a receiver: worker i's ranks are 1 + i·tp .. (i + 1)·tp of an (n·tp + 1)-rank group."""
    import torch.multiprocessing as mp

    from glm5.rl.rollout_client import ProcessRolloutClient
    from glm5.rl.weight_sync import DistWeightSender, SharedMemoryWeightSync

    if n < 1:
        raise ValueError(f"rollout workers must be >= 1, got {n}")
    shm = None
    if spec.weight_transport == "shm":
        if policy_model is None:
            raise ValueError("shared-memory weight sync needs the policy model")
        shm = SharedMemoryWeightSync(policy_model, 0, mp.get_context("spawn"))
    clients = []
    try:
        for i, device in enumerate(worker_devices(spec.device, n, spec.tp)):
            s = dataclasses.replace(spec, device=device)  # each worker on GPUs of its own (CPU: unchanged)
            if spec.weight_transport == "dist":
                s = dataclasses.replace(s, dist={**spec.dist, "rank": 1 + i * spec.tp, "world_size": 1 + n * spec.tp})
            clients.append(ProcessRolloutClient(s, make_prompt=make_prompt, shm=shm, wait=False))
        sender = None
        if spec.weight_transport == "dist":
            d = spec.dist
            sender = DistWeightSender(d["host"], d["port"], 1 + n * spec.tp, d.get("backend", "gloo"))
        for c in clients:
            c.wait_ready(start_timeout)
    except BaseException:
        for c in clients:
            c.close(timeout=5)
        raise
    return RolloutPool(clients, shm=shm, sender=sender)
