"""Bounded load on loopback: 32 concurrent streaming clients, all complete, no errors, and the engine
batches them (fewer engine steps than tokens). benchmarks/bench_serve.py is the measured version."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from .conftest import API_KEY, MODEL_NAME


async def _stream_one(client: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "seed": i}
    t0 = time.perf_counter()
    ttft, usage, finish, done = None, None, None, False
    async with client.stream("POST", "/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                ch = chunk["choices"][0]
                if ttft is None and (ch["delta"].get("reasoning_content") or ch["delta"].get("content")):
                    ttft = time.perf_counter() - t0
                finish = ch.get("finish_reason") or finish
            else:
                usage = chunk["usage"]
    return {"ttft": ttft, "usage": usage, "finish": finish, "done": done}


def test_32_concurrent_streaming_clients(server, http):
    steps_before = _metric(http.get("/metrics").text, "glm5_engine_steps_total")

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.wait_for(asyncio.gather(*(_stream_one(client, i, 12) for i in range(32))), 180)

    results = asyncio.run(main())
    assert len(results) == 32
    for r in results:
        assert r["done"] and r["finish"] == "length" and r["usage"]["completion_tokens"] == 12
        assert r["ttft"] is not None
    steps = _metric(http.get("/metrics").text, "glm5_engine_steps_total") - steps_before
    assert steps < 32 * 12 / 2  # continuous batching, not one request at a time


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)
