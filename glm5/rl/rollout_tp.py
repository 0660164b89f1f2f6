"""Tensor-parallel rollout workers (``glm5 rl --rollout-tp N``): one rollout engine split over N processes.

slime runs every SGLang rollout engine with tensor parallelism; here a rollout worker with ``WorkerSpec.tp = N``
is a group of N processes with a torch.distributed group of its own (gloo on CPU, NCCL on CUDA; its rendezvous
store on 127.0.0.1 at a free port picked by the client). The client (``glm5.rl.rollout_client``) starts them all:

* rank 0 is the ordinary rollout worker (``glm5.rl.rollout_worker.rollout_worker_main``): it talks to the
  trainer over the usual queues and runs the whole engine (scheduler, sampler, rewards), as the driver of
  ``glm5.engine.parallel``: every model call it makes is broadcast to the other ranks first;
* ranks 1..N-1 run :func:`rollout_follower_main`: the same engine built collectively (each rank reads its slice
  of the checkpoint), then ``glm5.engine.parallel.follow``: they repeat the driver's model calls on their own
  shard and cache until the driver releases them.

Weights: every rank is a receiver of the trainer's weight transport (the shared-memory copy, or a rank of its
broadcast group) and takes its own slice of the whole tensors (``glm5.rl.weight_sync.load_weights``). On a
"weights" message the driver announces the load to its followers, all ranks load, and they compare the versions
they now hold before the driver acknowledges: the trainer never sees a version that one shard lacks.

Nothing is left running: the driver releases its followers when it stops or finds the trainer gone; a follower
also watches the trainer and the driver itself and exits within a second when either is gone (a SIGKILL, or a
driver that died of an error in the middle of a step, whose collectives would otherwise never complete).
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch

__all__ = ["join_rollout_group", "tp_engine_kwargs", "check_versions_agree", "rollout_follower_main",
           "rank_device", "worker_devices", "check_rollout_gpus"]

# an idle rollout engine (trainer busy, evaluation between steps) leaves its followers waiting in a broadcast for
# as long as that takes: the group's timeout must outlast it. Dead peers are found by the watchdog, not by this.
GROUP_TIMEOUT = datetime.timedelta(hours=12)
WATCH_EVERY_S = 0.5


# ------------------------------------------------------------------------------------------- GPU placement
# Rollout workers on CUDA take consecutive GPUs from the index of ``--rollout-device`` (``cuda`` is ``cuda:0``):
# worker w's tensor-parallel rank r runs on GPU base + w·tp + r, as slime lays out its SGLang engines. Without
# this every worker (and every rank r of every group) would land on the same GPUs.
def _cuda_index(device: str) -> int | None:
    d = torch.device(device)
    return None if d.type != "cuda" else (d.index or 0)


def rank_device(device: str, rank: int) -> str:
    """The device of tensor-parallel rank ``rank`` of a worker whose rank 0 runs on ``device``."""
    base = _cuda_index(device)
    return device if base is None else f"cuda:{base + rank}"


def worker_devices(device: str, workers: int, tp: int) -> list[str]:
    """The device of each worker's rank 0."""
    return [rank_device(device, w * tp) for w in range(workers)]


def check_rollout_gpus(device: str, workers: int, tp: int, device_count: int | None = None) -> None:
    """Refuse, before anything starts, a layout that needs GPUs this machine does not have."""
    base = _cuda_index(device)
    if base is None:
        return
    if device_count is None:
        device_count = torch.cuda.device_count()
    need = base + workers * tp
    if need > device_count:
        raise ValueError(f"{workers} rollout worker(s) × {tp} tensor-parallel rank(s) from {device} need GPUs "
                         f"{base}..{need - 1}, but this machine has {device_count} (lower --rollout-workers / "
                         "--rollout-tp, or start --rollout-device at a lower index)")


def join_rollout_group(spec, rank: int):
    """This process's TensorParallel in its rollout worker's group (``spec.tp`` ranks meeting at
    127.0.0.1:``spec.tp_port``): the default torch.distributed group of the process, which the engine's own
    start-up agreements (cache size, CPU weight layouts) and the model's collectives use."""
    import torch.distributed as dist

    from glm5.model.tensor_parallel import TensorParallel

    backend = "nccl" if torch.device(spec.device).type == "cuda" else "gloo"
    if backend == "nccl":  # the engine's init_tensor_parallel places a rank on GPU LOCAL_RANK, torchrun's convention
        os.environ["LOCAL_RANK"] = str(_cuda_index(rank_device(spec.device, rank)))
    store = dist.TCPStore("127.0.0.1", spec.tp_port, spec.tp, rank == 0, timeout=datetime.timedelta(minutes=10))
    dist.init_process_group(backend, store=store, rank=rank, world_size=spec.tp, timeout=GROUP_TIMEOUT)
    return TensorParallel(rank=rank, world=spec.tp)


def tp_engine_kwargs(spec) -> dict:
    """The engine arguments of a worker: ``spec.engine_kwargs`` with its tensor-parallel size."""
    if spec.tp == 1:
        return dict(spec.engine_kwargs)
    return {**spec.engine_kwargs, "tensor_parallel_size": spec.tp}


def check_versions_agree(version: int, tp) -> list[int]:
    """Every rank's weight version after a load, on every rank (a collective); raises on rank 0 when they differ
    (a shard left on other weights would make the engine's logits garbage)."""
    import torch.distributed as dist

    if tp.world == 1:
        return [version]
    got: list = [None] * tp.world
    dist.all_gather_object(got, int(version), group=tp.group)
    if tp.rank == 0 and len(set(got)) != 1:
        raise RuntimeError(f"tensor-parallel ranks of the rollout worker hold different weight versions: {got}")
    return got


# ----------------------------------------------------------------------------------------------- followers
def rollout_follower_main(spec, rank: int, driver_pid: int, shm_sync=None) -> None:
    """Entry point of tensor-parallel rank ``rank`` >= 1 of a rollout worker (see the module docstring)."""
    from glm5.engine.parallel import follow
    from glm5.rl.rollout import RolloutConfig, build_rollout_engine
    from glm5.rl.rollout_worker import _leave_signals_to_the_trainer, make_weight_loader
    from glm5.tokenizer import GLM5Tokenizer

    _leave_signals_to_the_trainer()
    _watch(driver_pid)
    torch.set_num_threads(max(1, spec.threads))
    tp = join_rollout_group(spec, rank)
    tok = GLM5Tokenizer.from_pretrained(spec.tokenizer_dir or spec.model_dir)
    # built with the driver's arguments: the engine's start-up collectives must match the driver's one for one
    rollout = build_rollout_engine(spec.model_dir, tokenizer=tok, device=spec.device, dtype=spec.dtype,
                                   engine_kwargs=tp_engine_kwargs(spec), cfg=RolloutConfig(**spec.rollout))
    load = make_weight_loader(spec, rollout.engine, shm_sync, rank)

    def weights() -> None:
        load()
        check_versions_agree(rollout.engine.weight_version, tp)

    # sleep / wake_up: the driver's offload_rollout, announced after it did the same (glm5.rl.rollout_worker)
    follow(rollout.engine.runner, tp, {"weights": weights, "sleep": rollout.engine.sleep,
                                       "wake_up": rollout.engine.wake_up})


def _watch(driver_pid: int) -> None:
    """A daemon thread that ends this process when the trainer (our parent) or the driver is gone: the main
    thread may be blocked in a collective that no one will complete."""
    from glm5.rl.rollout_worker import _parent_alive

    def run():
        while True:
            time.sleep(WATCH_EVERY_S)
            if not _parent_alive() or not pid_alive(driver_pid):
                os._exit(3)

    threading.Thread(target=run, daemon=True, name="glm5-rollout-tp-watch").start()


def pid_alive(pid: int) -> bool:
    """False once process ``pid`` has exited, a zombie not yet reaped by its parent included."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")
    try:  # no /proc (not Linux): signal 0 only tells that the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
