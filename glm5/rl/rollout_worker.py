"""The rollout process: :func:`rollout_worker_main` builds a :class:`~glm5.rl.rollout.RolloutEngine` from a
checkpoint directory (:class:`WorkerSpec`) and serves a control queue (submit / abort / weight update / stop)
while stepping the engine; finished samples stream back on a result queue. It exits on "stop", and on its own
when the trainer that started it is gone. ``glm5.rl.rollout_client.ProcessRolloutClient`` starts it and talks to
it; a Ray actor runs the same loop in a thread (``glm5.rl.ray_launcher``). With ``WorkerSpec.tp`` > 1 this process
is rank 0 of a tensor-parallel group and drives ranks 1..tp-1 (``glm5.rl.rollout_tp``).
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from dataclasses import dataclass, field

import torch

from glm5.rl.rollout import RolloutConfig, build_rollout_engine

__all__ = ["WorkerSpec", "rollout_worker_main"]


@dataclass
class WorkerSpec:
    model_dir: str
    rollout: dict  # RolloutConfig fields
    engine_kwargs: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    weight_transport: str = "shm"  # "shm" | "dist"
    dist: dict = field(default_factory=dict)  # host, port, rank (of tp rank 0; rank r is rank + r), world_size, backend
    tokenizer_dir: str | None = None
    tp: int = 1  # tensor-parallel ranks of this worker's engine (glm5.rl.rollout_tp)
    tp_port: int = 0  # their rendezvous port on 127.0.0.1 (the client picks a free one)


def rollout_worker_main(spec: WorkerSpec, in_q, out_q, shm_sync=None) -> None:
    """Entry point of the rollout process (see module docstring). Messages in: ("submit", [Sample]),
    ("abort",), ("weights", version, abort_first), ("sleep", level), ("wake_up", tags), ("stats",), ("stop",).
    Messages out: ("ready", info), ("finished", [Sample], stats), ("aborted", [Sample]), ("weights_loaded",
    version, [Sample]), ("slept", level), ("woken", tags), ("stats", d), ("error", text)."""
    _leave_signals_to_the_trainer()
    tp = None
    try:
        torch.set_num_threads(max(1, spec.threads))
        from glm5.rl.rollout_tp import join_rollout_group, tp_engine_kwargs
        from glm5.tokenizer import GLM5Tokenizer

        tp = join_rollout_group(spec, 0) if spec.tp > 1 else None
        tok = GLM5Tokenizer.from_pretrained(spec.tokenizer_dir or spec.model_dir)
        rollout = build_rollout_engine(spec.model_dir, tokenizer=tok, device=spec.device, dtype=spec.dtype,
                                       engine_kwargs=tp_engine_kwargs(spec), cfg=RolloutConfig(**spec.rollout))
        load_weights = _driver_loader(make_weight_loader(spec, rollout.engine, shm_sync, 0), rollout.engine, tp)
        out_q.put(("ready", {"pid": os.getpid(), "version": rollout.version, "tp": spec.tp}))
        busy = idle = 0.0
        last_check = time.perf_counter()
        while True:
            msgs = []
            t0 = time.perf_counter()
            if rollout.has_work:
                try:
                    while True:
                        msgs.append(in_q.get_nowait())
                except queue.Empty:
                    pass
                if time.perf_counter() - last_check > 1.0:
                    last_check = time.perf_counter()
                    if not _parent_alive():
                        return _orphaned(out_q, tp)
            else:
                while True:  # idle: wait for work, but not past the trainer's death (SIGKILL leaves no "stop")
                    try:
                        msgs.append(in_q.get(timeout=1.0))
                        break
                    except queue.Empty:
                        if not _parent_alive():
                            break
                if not msgs:
                    return _orphaned(out_q, tp)
                try:
                    while True:
                        msgs.append(in_q.get_nowait())
                except queue.Empty:
                    pass
                idle += time.perf_counter() - t0
            stop = False
            for m in msgs:
                kind = m[0]
                if kind == "submit":
                    rollout.submit(m[1])
                    done = rollout.take_done()
                    if done:
                        out_q.put(("finished", done, {}))
                elif kind == "abort":
                    out_q.put(("aborted", rollout.abort_all()))
                elif kind == "weights":  # m[1] is the pushed version; the receiver reads it from the payload
                    # in-flight requests hold latents of the old weights: interrupt them (partial rollouts)
                    partial = rollout.abort_all()
                    load_weights()
                    out_q.put(("weights_loaded", rollout.version, partial))
                elif kind in ("sleep", "wake_up"):  # offload_rollout: memory for a trainer on the same device
                    getattr(rollout.engine, kind)(m[1])  # first here: it refuses (an error) if requests still run
                    _announce(kind, (m[1],), tp)  # then every tensor-parallel rank releases / retakes its shard
                    out_q.put(("slept" if kind == "sleep" else "woken", m[1]))
                elif kind == "stats":
                    out_q.put(("stats", {**rollout.stats, "busy_s": busy, "idle_s": idle}))
                elif kind == "stop":
                    stop = True
            if stop:
                break
            if rollout.has_work:
                t1 = time.perf_counter()
                done = rollout.step()
                busy += time.perf_counter() - t1
                if done:
                    out_q.put(("finished", done, {"busy_s": busy, "idle_s": idle, "version": rollout.version}))
        _release(tp)
        out_q.put(("stopped", {**rollout.stats, "busy_s": busy, "idle_s": idle}))
    except BaseException:
        # the followers are not released here: they may be inside a collective of the step that failed; they
        # see this process exit and exit too (glm5.rl.rollout_tp._watch)
        out_q.put(("error", traceback.format_exc()))
        raise


def make_weight_loader(spec: WorkerSpec, engine, shm_sync, tp_rank: int):
    """A callable loading the trainer's newest weights into ``engine`` from the spec's transport: a rank of its
    broadcast group (``spec.dist``; tensor-parallel rank r of the worker is group rank ``rank + r``), or the
    shared-memory copy. Every rank of a tensor-parallel worker has one and keeps its slice of the weights."""
    if spec.weight_transport == "dist":
        from glm5.rl.weight_sync import DistWeightReceiver

        d = spec.dist
        receiver = DistWeightReceiver(d["host"], d["port"], d.get("rank", 1) + tp_rank, d["world_size"],
                                      d.get("backend", "gloo"), device=spec.device)
        return lambda: receiver.recv(engine)
    if shm_sync is not None:
        shm_sync.local_version = 0
        return lambda: shm_sync.poll(engine)
    return lambda: None


def _driver_loader(load, engine, tp):
    """``load`` for rank 0: with followers, they are told to load too, and every rank must then hold the same
    version before rank 0 acknowledges it. From then on, every model call is announced to the followers."""
    if tp is None:
        return load
    from glm5.engine.parallel import announce, drive
    from glm5.rl.rollout_tp import check_versions_agree

    drive(engine.runner, tp)

    def load_everywhere():
        announce("weights", (), tp)
        load()
        check_versions_agree(engine.weight_version, tp)
    return load_everywhere


def _announce(name: str, args: tuple, tp) -> None:
    if tp is not None:
        from glm5.engine.parallel import announce

        announce(name, args, tp)


def _release(tp) -> None:
    if tp is not None:
        from glm5.engine.parallel import release_followers

        release_followers(tp)


def _leave_signals_to_the_trainer() -> None:
    """A rollout process ignores SIGINT and SIGTERM: a terminal's Ctrl-C (sent to the whole process group) or a
    scheduler's SIGTERM (sent to every process of the job) must not kill it in the middle of the trainer's last
    step. The trainer stops gracefully and then stops this process ("stop"); were the trainer killed instead, the
    parent check below ends this process within a second. Only in a child process's main thread (a Ray actor runs
    this loop in a thread of its own)."""
    import multiprocessing
    import signal
    import threading

    if multiprocessing.parent_process() is None or threading.current_thread() is not threading.main_thread():
        return
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _orphaned(out_q, tp=None) -> None:
    """The trainer is gone: release the followers and exit without waiting to flush anything to it."""
    _release(tp)
    out_q.cancel_join_thread()


def _parent_alive() -> bool:
    """False once the process that started this one has exited (killed trainers must not leave rollout workers
    holding a model and its KV cache). True where there is no parent to watch (not a multiprocessing child)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()
