"""Two spawned processes that form a torch.distributed group (gloo) in a test; imported from tests/ (on sys.path via
tests/conftest.py)."""

import multiprocessing as mp
import queue
import time


def run_two_ranks(target, *args, timeout: float = 60.0) -> dict:
    """Start ``target(rank, port, *args, out)`` for ranks 0 and 1 (``port``: a free loopback port for their
    rendezvous) and collect the two (key, value) pairs they put on ``out``. Stops early when both processes are gone
    (a rank that died reports nothing); stragglers are killed."""
    from glm5.rl.weight_sync import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < 2 and time.monotonic() < deadline:
        try:
            k, v = out.get(timeout=1)
            got[k] = v
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return got
