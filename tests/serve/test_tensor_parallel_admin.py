"""The RL admin routes (glm5/serve/admin.py) under ``glm5 serve --tensor-parallel-size 2`` (torchrun, 2 CPU ranks
over gloo): rank 0 does each operation and announces it, rank 1 does the same on its shard and cache, and they
agree before rank 0 answers. One launch for everything (torchrun start-up is the slow part on a small box)."""

from __future__ import annotations

import os
import re
import shutil
import signal

import httpx
import pytest

from glm5.config import GLM5Config
from glm5.engine import LLM, SamplingParams

from .test_admin_endpoints import _weights_dir
from .test_tensor_parallel_serve import _wait_healthy, launch_tp_server

PROMPT = "The king of the hill"


def _complete(http) -> httpx.Response:
    return http.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                              "ignore_eos": True})


def _text(http) -> str:
    r = _complete(http)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _offline(path) -> str:
    llm = LLM(str(path), max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text


def _checkpoints(model_dir, root):
    """B: A's architecture with other weights; two that rank 0 refuses (another width, a truncated shard)."""
    b = _weights_dir(root / "b", model_dir, seed=1)
    wide = _weights_dir(root / "wide", model_dir, seed=2,
                        hidden_size=GLM5Config.from_pretrained(model_dir).hidden_size * 2)
    truncated = shutil.copytree(b, root / "truncated")
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return b, wide, truncated


def test_admin_routes_act_on_every_tensor_parallel_rank(model_dir, tmp_path):
    b, wide, truncated = _checkpoints(model_dir, tmp_path)
    proc, url, log = launch_tp_server(model_dir, tmp_path, "--enable-sleep-mode", "--enable-weight-updates")
    http = httpx.Client(base_url=url, timeout=60)
    try:
        _wait_healthy(url, proc, log)
        before = _text(http)

        # level 1 on both ranks: 503 meanwhile, then the same greedy text (rank 1's shard and cache came back too)
        assert http.post("/sleep", params={"level": 1}).json() == {"is_sleeping": True, "level": 1}
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        r = _complete(http)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_sleeping", r.text
        assert http.post("/wake_up").json() == {"is_sleeping": False}
        assert _text(http) == before
        assert http.post("/reset_prefix_cache").json() == {"success": True}

        # refused by rank 0 before any rank hears of them: 400, and every rank keeps serving A
        for bad in (wide, truncated):
            r = http.post("/update_weights_from_disk", json={"model_path": str(bad)})
            assert r.status_code == 400 and r.json()["success"] is False and r.json()["weight_version"] == 0, r.text
        assert _text(http) == before

        # slime's cycle: level 2, wake the weights, load B on every rank (each its slice), wake the cache
        assert http.post("/sleep", params={"level": 2}).status_code == 200
        assert http.post("/wake_up", params={"tags": "weights"}).json() == {"is_sleeping": True}
        r = http.post("/update_weights_from_disk", json={"model_path": str(b)})
        assert r.status_code == 200 and r.json()["success"] and r.json()["weight_version"] == 1, r.text
        assert _complete(http).status_code == 503  # the cache still sleeps
        assert http.post("/wake_up", params={"tags": "kv_cache"}).json() == {"is_sleeping": False}
        got = _text(http)
        assert got == _offline(b) != before
        assert http.get("/health").json()["status"] == "ok"

        pid = int(re.search(r"Started server process \[(\d+)\]", log.read_text())[1])  # rank 0
        os.kill(pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]  # rank 1 was still in step, and was released
    finally:
        http.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("failing", ["stage", "copy"])
def test_a_follower_failure_is_reported_by_rank_and_left_as_documented(failing):
    """The two-phase copy with a fake engine on 2 gloo processes: a follower that cannot stage makes rank 0 raise a
    500 naming it and no rank copies; one whose copy fails makes rank 0 raise (its gate then closes)."""
    from two_ranks import run_two_ranks  # tests/two_ranks.py

    got = run_two_ranks(_commit_rank, failing)
    if failing == "stage":
        assert got[0][0] == "_Refused" and "rank 1: disk on fire" in got[0][1] and "no rank changed" in got[0][1]
        assert got[0][2] == got[1][2] == 0.0  # nobody copied
    else:
        assert got[0][0] == "RuntimeError" and "rank 1: RuntimeError: device on fire" in got[0][1]
        assert got[0][2] == 1.0  # rank 0 copied: the ranks hold a mix, which rank 0's caller reports


def _commit_rank(rank: int, port: int, failing: str, out) -> None:
    import datetime
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from glm5.model.tensor_parallel import TensorParallel
    from glm5.model.weights import load_weights
    from glm5.serve import admin

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    engine = SimpleNamespace(device=torch.device("cpu"), tp=TensorParallel(rank=rank, world=2), model=model,
                             sleep_mode=SimpleNamespace(asleep=set()), reset_prefix_cache=lambda: None)
    # LLMEngine.load_weights' copy, on whatever engine.model is when it runs
    engine.load_weights = lambda w, strict=True, sharded=False: load_weights(engine.model, w, strict, sharded)
    staged, error = {"weight": torch.ones(2, 2)}, None
    if rank == 1 and failing == "stage":
        staged, error = None, "disk on fire"
    if rank == 1 and failing == "copy":
        engine.model = SimpleNamespace(state_dict=lambda: (_ for _ in ()).throw(RuntimeError("device on fire")))
    try:
        admin._commit_shards(engine, staged, error, "/ckpt")
        result = ("ok", "")
    except Exception as e:  # noqa: BLE001  (reported to the test)
        result = (type(e).__name__, getattr(e, "message", str(e)))
    out.put((rank, (*result, float(model.weight.sum() / 4))))
    dist.destroy_process_group()
