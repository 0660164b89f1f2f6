"""Load test of ``glm5 serve`` on loopback: N concurrent streaming chat clients.

    python benchmarks/bench_serve.py                       # 32 clients, random-init glm5-nano, CPU
    python benchmarks/bench_serve.py --model DIR --clients 64 --max-tokens 128 --json out.json

Starts ``glm5 serve`` as a subprocess on a free 127.0.0.1 port (a checkpoint directory, or a random-init
preset with a tokenizer trained on the spot), then sends ``--clients`` streaming requests at once, each
``--rounds`` times, with ``ignore_eos`` so every request generates exactly ``--max-tokens`` tokens. Reports
time to first token (p50/p99), inter-token latency (p50/p99), per-request and aggregate output tokens/s,
and errors. Every request has a timeout and the run is bounded; traffic goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def build_model(path: Path, preset_name: str, seed: int = 0) -> Path:
    import torch

    from glm5.config import preset
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.tokenizer import train_bpe

    rng = random.Random(seed)
    words = ("the of and to in is that for it as with was on be by this are from at or weather city model token "
             "attention expert router layer sparse latent cache hello world json value 你好 世界 café 🙂").split()
    corpus = [" ".join(rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 999))
                       for _ in range(rng.randint(20, 60))) for _ in range(200)]
    tok = train_bpe(corpus, vocab_size=1024)
    cfg = preset(preset_name, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_ids)
    torch.manual_seed(seed)
    GLM5ForCausalLM(cfg).init_weights(seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int, timeout: float) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Request {i}: tell me about the weather."}],
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "seed": i, "thinking": {"type": "disabled"}}
    t0 = time.perf_counter()
    first, last, token_times, usage, err = None, None, [], None, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]["message"]
                    break
                if chunk.get("usage") and not chunk["choices"]:
                    usage = chunk["usage"]
                    continue
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                    now = time.perf_counter()
                    first = first or now
                    token_times.append(now)
                    last = now
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if err or usage is None:
        return {"error": err or "no usage chunk"}
    end = time.perf_counter()
    n = usage["completion_tokens"]
    itl = [(b - a) for a, b in zip(token_times, token_times[1:])]
    return {"ttft": (first or end) - t0, "e2e": end - t0, "tokens": n, "itl": itl,
            "tok_s": (n - 1) / (last - first) if first and last and last > first else float("nan")}


async def run_load(url: str, clients: int, rounds: int, max_tokens: int, timeout: float, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results = []
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as client:
        for r in range(rounds):
            results += await asyncio.gather(*(one_request(client, r * clients + i, max_tokens, timeout)
                                              for i in range(clients)))
        wall = time.perf_counter() - t0
        metrics = (await client.get("/metrics")).text
    ok = [x for x in results if "error" not in x]
    errors = [x["error"] for x in results if "error" in x]
    ttft = [x["ttft"] for x in ok]
    itl = [d for x in ok for d in x["itl"]]
    total_tokens = sum(x["tokens"] for x in ok)
    return {
        "clients": clients, "rounds": rounds, "requests": len(results), "completed": len(ok), "errors": len(errors),
        "error_samples": errors[:3], "max_tokens": max_tokens, "wall_s": wall,
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "ttft_max_s": max(ttft, default=float("nan")),
        "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99),
        "output_tokens": total_tokens, "aggregate_output_tok_s": total_tokens / wall,
        "per_request_tok_s_p50": pct([x["tok_s"] for x in ok], 0.5),
        "e2e_p50_s": pct([x["e2e"] for x in ok], 0.5), "e2e_p99_s": pct([x["e2e"] for x in ok], 0.99),
        "server_metrics_excerpt": [line for line in metrics.splitlines()
                                   if line.startswith(("glm5_generation_tokens_total", "glm5_requests_total",
                                                       "glm5_engine_steps_total"))],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a random-init preset built in a temp dir)")
    ap.add_argument("--preset", default="glm5-nano")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="glm5_bench_")
        model = str(build_model(Path(tmp.name), args.preset))
    port = free_port()
    key = "bench-" + os.urandom(8).hex()
    cmd = [sys.executable, "-m", "glm5.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--max-num-seqs", str(args.max_num_seqs), "--max-model-len",
           str(args.max_model_len), "--log-level", "warning"]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, env={**os.environ, "GLM5_API_KEY": key})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print("server did not start", file=sys.stderr)
                return 1
            time.sleep(0.3)
        # warm-up (first-call overheads), then the measured run
        asyncio.run(run_load(url, 2, 1, 4, args.timeout, key))
        res = asyncio.run(run_load(url, args.clients, args.rounds, args.max_tokens, args.timeout, key))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if tmp is not None:
            tmp.cleanup()
    res.update(model=args.model or f"random-init {args.preset}", device=args.device or "default",
               cpu_count=os.cpu_count(), torch_threads=os.environ.get("OMP_NUM_THREADS"))
    print(json.dumps(res, indent=2))
    print(f"\n{res['completed']}/{res['requests']} completed, {res['errors']} errors | TTFT p50 "
          f"{res['ttft_p50_s'] * 1e3:.0f} ms, p99 {res['ttft_p99_s'] * 1e3:.0f} ms | ITL p50 "
          f"{res['itl_p50_s'] * 1e3:.1f} ms, p99 {res['itl_p99_s'] * 1e3:.1f} ms | "
          f"{res['aggregate_output_tok_s']:.0f} output tok/s aggregate, "
          f"{res['per_request_tok_s_p50']:.1f} tok/s per request (p50)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["errors"] == 0 and res["completed"] == res["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
