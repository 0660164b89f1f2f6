"""The driver's heartbeat (glm5.engine.parallel.drive): followers of an idle tensor-parallel server wait inside a
collective, which fails once it outlasts the group's timeout. Two gloo processes with a 2-second timeout: with the
heartbeat the driver idles three timeouts and its next model call (a broadcast, then an all-reduce, as a sharded
model makes) still reaches the follower; without it the follower's wait fails."""

import datetime
import time

import pytest
import torch
import torch.distributed as dist

from glm5.engine.parallel import drive, follow, release_followers
from glm5.model.tensor_parallel import TensorParallel
from two_ranks import run_two_ranks  # tests/two_ranks.py

TIMEOUT_S = 2.0


class Runner:
    """The model calls a driver announces; ``forward`` all-reduces as a sharded model's layers do."""

    device = torch.device("cpu")

    def forward(self, x):
        dist.all_reduce(x)
        return x

    def logits(self, *a):
        return None

    mtp = mtp_logits = idle = logits


def _rank(rank: int, port: int, heartbeat: bool, out) -> None:
    # the rendezvous waits as long as a loaded box needs to start both processes; only the collectives get the
    # short timeout under test
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    tp = TensorParallel(rank=rank, world=2)
    runner = Runner()
    try:
        if rank == 1:
            out.put(("follower", follow(runner, tp)))
            return
        drive(runner, tp, heartbeat_s=TIMEOUT_S / 4 if heartbeat else None)
        time.sleep(3 * TIMEOUT_S)  # an idle server
        out.put(("sum", float(runner.forward(torch.ones(1)))))
        release_followers(tp)
    except Exception as e:  # noqa: BLE001  (reported to the test)
        out.put((f"rank {rank} failed", type(e).__name__))


def _run(heartbeat: bool) -> dict:
    return run_two_ranks(_rank, heartbeat)


def test_idle_driver_keeps_its_followers_with_a_heartbeat():
    got = _run(heartbeat=True)
    assert got.get("sum") == 2.0 and got.get("follower") == 1, got  # one model call made, and no heartbeat counted


@pytest.mark.slow
def test_without_a_heartbeat_the_idle_follower_times_out():
    # the failure the heartbeat prevents (a negative control: the timeout above is short enough to bite)
    got = _run(heartbeat=False)
    assert "rank 1 failed" in got, got
