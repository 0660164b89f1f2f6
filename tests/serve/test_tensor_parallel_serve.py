"""``glm5 serve --tensor-parallel-size 2`` under torchrun (2 CPU ranks over gloo): rank 0 serves and drives, rank 1
runs its model calls. Answers equal one process's; a request needing a logits processor works; SIGINT to rank 0
releases rank 1 and the whole launch exits cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

from glm5.engine import LLM, SamplingParams


def _wait_healthy(url: str, proc: subprocess.Popen, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("server did not start:\n" + log.read_text()[-4000:])
        time.sleep(0.3)


def launch_tp_server(model_dir, tmp_path, *extra: str) -> tuple[subprocess.Popen, str, object]:
    """``glm5 serve --tensor-parallel-size 2`` under torchrun on a free loopback port, in its own session (so the
    whole launch can be killed): (process, base url, log path)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "glm5.cli",
           "serve", "--model", str(model_dir), "--port", str(port), "--served-model-name", "m", "--max-model-len",
           "512", "--tensor-parallel-size", "2", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def test_two_ranks_serve_what_one_process_serves(model_dir, tmp_path):
    proc, url, log = launch_tp_server(model_dir, tmp_path, "--log-level", "info")
    try:
        _wait_healthy(url, proc, log)
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "m", "prompt": "The king", "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 2})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
            "response_format": {"type": "json_object"}, "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200, r.text
        assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)  # the grammar, on rank 0

        llm = LLM(str(model_dir), max_model_len=512)
        ref = llm.generate(llm.tokenizer.encode("The king"), SamplingParams(temperature=0, max_tokens=16,
                                                                             ignore_eos=True, logprobs=2),
                           use_tqdm=False)[0].outputs[0]
        assert choice["text"] == ref.text
        got = choice["logprobs"]["token_logprobs"]
        want = [step[t] for step, t in zip(ref.logprobs, ref.token_ids)]
        assert len(got) == len(want) and all(abs(a - b) < 1e-4 for a, b in zip(got, want))

        pid = int(re.search(r"Started server process \[(\d+)\]", log.read_text())[1])  # rank 0
        os.kill(pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]  # rank 1 was released, not killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
