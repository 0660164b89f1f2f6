"""Tensor-parallel engines under torchrun, one process per rank, in two modes: every rank running the same program
(SPMD, offline ``LLM``), or rank 0 driving and the others following its model calls (``glm5 serve``; see below).

SPMD is vLLM's ``distributed_executor_backend="external_launcher"`` mode: launch the script with
``torchrun --nproc-per-node N script.py`` and build ``LLM(model, tensor_parallel_size=N)`` on every rank with the
same prompts in the same order. Each rank holds 1/N of the sharded weights (``glm5.model.tensor_parallel``) and a
full engine (scheduler, cache, sampler). The model's collectives leave every rank with identical logits, and the
engine is deterministic given its inputs (requests, seeds, the engine seed), so every rank takes the same
scheduling and sampling decisions and produces the same outputs; no step is broadcast. What could differ per
process (the CPU weight-layout timings, the free GPU memory that sizes the cache) is agreed on at start. A user's
logits processor must therefore be deterministic too: one drawing its own random numbers would split the ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time

import torch

from glm5.model.tensor_parallel import TensorParallel


def group_timeout() -> datetime.timedelta:
    """How long a collective may wait (``GLM5_TP_TIMEOUT_S``, default 30 minutes): a rank that never arrives is
    then an error, not a hang. An idle server's followers wait far longer than that: see :func:`drive`'s heartbeat."""
    return datetime.timedelta(seconds=float(os.environ.get("GLM5_TP_TIMEOUT_S", 1800)))


def init_tensor_parallel(size: int, device: str | torch.device | None, expert_parallel: bool = False
                         ) -> tuple[TensorParallel, torch.device]:
    """(this process's TensorParallel, its device) for ``tensor_parallel_size=size`` (routed experts dealt out whole
    with ``expert_parallel``). Initialises torch.distributed from torchrun's environment when needed (gloo on CPU,
    NCCL on CUDA)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if size == 1:
        return TensorParallel(), dev
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(f"tensor_parallel_size={size} runs one process per rank: launch the script with "
                             f"`torchrun --nproc-per-node {size} ...` (every rank runs it with the same prompts)")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=group_timeout())
    world = dist.get_world_size()
    if world != size:
        raise ValueError(f"tensor_parallel_size={size} but torch.distributed has {world} processes; they must be equal")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
        torch.cuda.set_device(dev)
    return TensorParallel(rank=dist.get_rank(), world=world, expert_parallel=expert_parallel), dev


def agree_min(value: int, tp: TensorParallel, device: torch.device) -> int:
    """The smallest of every rank's ``value`` (e.g. how many cache blocks fit): the ranks' schedulers must be
    identical, so every rank uses what the tightest one can hold."""
    if tp.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
    return int(t.item())


def from_rank0(obj, tp: TensorParallel):
    """Rank 0's ``obj`` on every rank (a decision taken from timings, which differ between processes)."""
    if tp.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=tp.group)
    return box[0]


# --------------------------------------------------------------------------- one driver, N-1 followers
# The SPMD mode above needs every rank to see the same requests, which an HTTP server cannot arrange. There, rank 0
# (the driver) runs the whole engine and the server, and ranks 1..N-1 only run the model: each model call of the
# driver's ModelRunner is first broadcast, with its inputs, and every follower makes the same call on its own shard
# and its own cache (vLLM's driver worker). Scheduling, sampling, grammars and detokenizing happen on rank 0 alone,
# so nothing but tensors and a method name ever crosses (no logits processor has to be pickled).

RUNNER_CALLS = ("forward", "logits", "mtp", "mtp_logits", "idle")


def _move(obj, device: torch.device):
    """``obj`` with every tensor in it (lists, tuples, dicts, dataclasses) moved to ``device``."""
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _move(getattr(obj, f.name), device)
                                          for f in dataclasses.fields(obj) if f.init})
    return obj


def _broadcast(msg, tp: TensorParallel):
    import torch.distributed as dist

    box = [msg]
    dist.broadcast_object_list(box, src=0, group=tp.group)
    return box[0]


class _Heartbeat:
    """Rank 0 of an idle server: a no-op broadcast whenever no model call went out for ``interval`` seconds.

    Why: the followers wait for the driver's next call inside a collective, and a collective that waits longer
    than the group's timeout fails (gloo raises, NCCL's watchdog aborts the process). A server idle for half an
    hour would lose its followers. ``lock`` is held across each announced call, model collectives included, so a
    heartbeat never lands between an announcement and the collectives it starts."""

    def __init__(self, tp: TensorParallel, interval: float, device: torch.device):
        import threading

        self.tp, self.interval, self.device = tp, interval, device
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.stopped = threading.Event()
        self.beats = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="glm5-tp-heartbeat")
        self.thread.start()

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL's object broadcast stages on the current device
        while not self.stopped.wait(self.interval / 4):
            with self.lock:
                if self.stopped.is_set() or time.monotonic() - self.last < self.interval:
                    continue
                try:
                    _broadcast(("noop", ()), self.tp)
                except (RuntimeError, ConnectionError):  # followers gone: the server's next call reports it
                    return
                self.last = time.monotonic()
                self.beats += 1

    def stop(self) -> None:
        self.stopped.set()


_HEARTBEATS: dict[int, _Heartbeat] = {}  # id(TensorParallel) of a driving rank 0 -> its heartbeat


def drive(runner, tp: TensorParallel, heartbeat_s: float | None = None) -> None:
    """Rank 0: from now on every model call of ``runner`` is announced to the followers first. ``heartbeat_s``:
    also announce a no-op after that many idle seconds (a server, idle for as long as its clients are; see
    :class:`_Heartbeat`; :func:`heartbeat_interval` suits the group's timeout)."""
    if tp.world == 1:
        return
    if tp.rank != 0:
        raise ValueError("only rank 0 drives; the other ranks follow")
    hb = None
    if heartbeat_s:
        hb = _HEARTBEATS[id(tp)] = _Heartbeat(tp, heartbeat_s, runner.device)
    for name in RUNNER_CALLS:
        call = getattr(runner, name)

        def announced(*args, _name=name, _call=call):
            if hb is None:
                _broadcast((_name, _move(args, torch.device("cpu"))), tp)  # CPU: a pickled CUDA tensor keeps its index
                return _call(*args)
            with hb.lock:
                _broadcast((_name, _move(args, torch.device("cpu"))), tp)
                try:
                    return _call(*args)
                finally:
                    hb.last = time.monotonic()
        setattr(runner, name, announced)


def heartbeat_interval() -> float:
    """A heartbeat period well inside the group's timeout (a sixth of it)."""
    return max(0.5, group_timeout().total_seconds() / 6)


def release_followers(tp: TensorParallel) -> None:
    """Rank 0, when serving ends: the followers' loops return. A terminal's Ctrl-C reaches every rank at once, and
    followers that already left cannot be told: nothing is left to release then."""
    if tp.world > 1 and tp.rank == 0:
        hb = _HEARTBEATS.pop(id(tp), None)
        if hb is not None:
            hb.stop()
            hb.lock.acquire()  # not in the middle of a beat; released never: nothing is announced after this
        try:
            _broadcast(None, tp)
        except (RuntimeError, ConnectionError):
            pass


def announce(name: str, args: tuple, tp: TensorParallel) -> None:
    """Rank 0: have every follower run its handler ``name`` (one of those given to ``follow``) with ``args``
    (picklable; tensors travel on the CPU). For work beside the model calls that every rank must do at the same
    point of the driver's sequence, e.g. loading new weights into its shard between two engine steps."""
    with announced(name, args, tp):  # one collective at a time on the group: never beside a heartbeat's
        pass


@contextlib.contextmanager
def announced(name: str, args: tuple, tp: TensorParallel):
    """Rank 0: :func:`announce`, then keep the group to this thread until the block ends. For a handler that runs
    collectives of its own with rank 0 (the ranks agreeing that each did its part, e.g. loaded its shard): rank 0
    makes the matching calls inside the block, where no heartbeat can land between them (a heartbeat's broadcast
    would meet the followers' gather and scramble the group's sequence). Model calls of another thread wait too."""
    if tp.world == 1:
        yield
        return
    if name in RUNNER_CALLS:
        raise ValueError(f"{name!r} is a model call; announce names a follower handler")
    hb = _HEARTBEATS.get(id(tp))
    with hb.lock if hb is not None else contextlib.nullcontext():
        _broadcast((name, _move(args, torch.device("cpu"))), tp)
        try:
            yield
        finally:
            if hb is not None:
                hb.last = time.monotonic()


def follow(runner, tp: TensorParallel, handlers: dict | None = None) -> int:
    """Ranks 1..N-1: make the driver's model calls until it releases us; returns how many were made.
    ``handlers``: name -> callable for what the driver ``announce``s besides model calls (a rollout worker's weight
    loads, a server's admin operations: glm5.serve.admin.follower_handlers)."""
    n = 0
    handlers = handlers or {}
    with torch.inference_mode():
        try:
            while (msg := _broadcast(None, tp)) is not None:
                name, args = msg
                if name == "noop":  # the driver's heartbeat while it is idle: nothing to do
                    continue
                if name in RUNNER_CALLS:
                    getattr(runner, name)(*_move(args, runner.device))
                elif name in handlers:
                    handlers[name](*args)
                else:
                    raise RuntimeError(f"follower: unexpected call {name!r} from the driver")
                n += 1
        except KeyboardInterrupt:  # Ctrl-C in the terminal: the driver got it too and is shutting down
            pass
    return n
