"""Sleep mode (``LLM.sleep`` / ``wake_up``): what a colocated RL step pays to hand the engine's memory to the trainer
and take it back, and how much memory that frees.

For each level: build an engine with a KV cache of ``--kv-gib``, decode once (so the cache, graphs and scratch exist),
then time ``sleep(level)`` and the wake-up. Level 1 wakes with ``wake_up()`` (weights copied back from host memory;
on CPU they never moved). Level 2 wakes as the RL loop does: ``wake_up(["weights"])``, a full weight load from a
host state dict (``glm5.rl.weight_sync.load_weights``), ``wake_up(["kv_cache"])``. Memory is the process RSS on CPU
and torch's allocated / reserved bytes on CUDA, read awake, asleep and awake again. Greedy output after waking is
checked against the output before sleeping.

    python benchmarks/bench_sleep.py [--preset glm5-small] [--device cpu|cuda] [--kv-gib 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glm5 import GLM5ForCausalLM, preset  # noqa: E402
from glm5.engine import LLM, SamplingParams  # noqa: E402
from glm5.rl.weight_sync import load_weights  # noqa: E402


def memory(device: str) -> dict:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return {"allocated_gib": torch.cuda.memory_allocated() / 2**30, "reserved_gib": torch.cuda.memory_reserved() / 2**30}
    with open("/proc/self/statm") as f:
        return {"rss_gib": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30}


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm5-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--kv-gib", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    model = GLM5ForCausalLM(preset(a.preset)).init_weights(0).to(device=a.device, dtype=dtype).eval()
    host_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    llm = LLM(model, device=a.device, max_model_len=512, kv_cache_memory=int(a.kv_gib * 2**30))
    prompt = [[(17 * i) % 1000 + 1 for i in range(64)]]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def tokens():
        return llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids

    ref = tokens()
    rows = []
    for level in (1, 2):
        awake = memory(a.device)
        t_sleep = timed(lambda: llm.sleep(level), a.device)
        asleep = memory(a.device)
        if level == 1:
            t_wake = timed(llm.wake_up, a.device)
        else:
            t_wake = timed(lambda: (llm.wake_up(["weights"]), load_weights(model, host_state),
                                    llm.wake_up(["kv_cache"])), a.device)
        row = dict(level=level, sleep_s=t_sleep, wake_s=t_wake, awake=awake, asleep=asleep,
                   woken=memory(a.device), same_tokens=tokens() == ref)
        print(json.dumps(row), flush=True)
        rows.append(row)
    dev_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu"
    result = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=dev_name,
                  torch=torch.__version__, preset=a.preset, dtype=str(dtype), weights_gib=weights_gib,
                  kv_cache_gib=llm.engine.kv_cache.nbytes() / 2**30, rows=rows)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
