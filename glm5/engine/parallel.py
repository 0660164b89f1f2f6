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

import datetime
import os

import torch

from glm5.model.tensor_parallel import TensorParallel


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
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
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


def drive(runner, tp: TensorParallel) -> None:
    """Rank 0: from now on every model call of ``runner`` is announced to the followers first."""
    if tp.world == 1:
        return
    if tp.rank != 0:
        raise ValueError("only rank 0 drives; the other ranks follow")
    for name in RUNNER_CALLS:
        call = getattr(runner, name)

        def announced(*args, _name=name, _call=call):
            _broadcast((_name, _move(args, torch.device("cpu"))), tp)  # CPU: a pickled CUDA tensor keeps its index
            return _call(*args)
        setattr(runner, name, announced)


def release_followers(tp: TensorParallel) -> None:
    """Rank 0, when serving ends: the followers' loops return. A terminal's Ctrl-C reaches every rank at once, and
    followers that already left cannot be told: nothing is left to release then."""
    if tp.world > 1 and tp.rank == 0:
        try:
            _broadcast(None, tp)
        except (RuntimeError, ConnectionError):
            pass


def announce(name: str, args: tuple, tp: TensorParallel) -> None:
    """Rank 0: have every follower run its handler ``name`` (one of those given to ``follow``) with ``args``
    (picklable; tensors travel on the CPU). For work beside the model calls that every rank must do at the same
    point of the driver's sequence, e.g. loading new weights into its shard between two engine steps."""
    if tp.world == 1:
        return
    if name in RUNNER_CALLS:
        raise ValueError(f"{name!r} is a model call; announce names a follower handler")
    _broadcast((name, _move(args, torch.device("cpu"))), tp)


def follow(runner, tp: TensorParallel, handlers: dict | None = None) -> int:
    """Ranks 1..N-1: make the driver's model calls until it releases us; returns how many were made.
    ``handlers``: name -> callable for what the driver ``announce``s besides model calls (none for serving)."""
    n = 0
    handlers = handlers or {}
    with torch.inference_mode():
        try:
            while (msg := _broadcast(None, tp)) is not None:
                name, args = msg
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
