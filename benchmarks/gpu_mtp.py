"""GPU: MTP speculative decoding at batch 1, with and without CUDA graphs (``bench_engine.py --only gpumtp``).

Until the eighteenth session the engine switched CUDA graphs off whenever MTP drafts were on, so speculation ran
every step eagerly and could lose to plain graph decoding. Verification steps now replay graphs captured for
k + 1 rows per sequence (glm5/engine/static_decode.py); drafting stays eager (one layer per draft). This measures
batch-1 decode tokens/s of the toy MTP model (``train_toy_mtp``: arithmetic progressions, where the MTP layer
predicts well) in bf16 on the GPU:

  plain eager | plain graphs | spec eager | spec graphs (verification graphed)

Each: generate 1 + D tokens and 1 token, the difference is D decode tokens; best of ``repeats``; greedy outputs
compared with plain graphs (a bf16 model: a tie can still flip, reported, not asserted).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams


def bench_gpu_mtp(args, results, train_toy_mtp) -> None:
    dev = "cuda" if torch.cuda.is_available() else None
    if dev is None:
        print("gpumtp: no CUDA device, skipped", flush=True)
        results["gpu_mtp"] = "skipped: no CUDA device"
        return
    toy_dir = Path(args.workdir) / "toy_glm5-tiny"
    if not (toy_dir / "config.json").exists():
        train_toy_mtp(toy_dir, "glm5-tiny", args.toy_steps)
    model = GLM5ForCausalLM.from_pretrained(toy_dir, dtype=torch.bfloat16, device=dev).eval()
    V, D, k = model.config.vocab_size, args.mtp_decode_tokens * 2, args.spec_tokens
    prompt = (1 + (5 + 2 * torch.arange(12)) % (V - 1)).tolist()  # a progression with step 2, as the CPU rows
    configs = {"plain eager": dict(use_cuda_graph=False), "plain graphs": {},
               "spec eager": dict(use_cuda_graph=False, num_speculative_tokens=k),
               "spec graphs": dict(num_speculative_tokens=k)}
    rows, outs = {}, {}
    for name, kw in configs.items():
        llm = LLM(model, device=dev, max_num_seqs=1, max_model_len=len(prompt) + D + 64, enable_prefix_caching=False,
                  kv_cache_memory=256 << 20, **kw)

        def timed(n):
            torch.cuda.synchronize()
            t = time.perf_counter()
            o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            torch.cuda.synchronize()
            return time.perf_counter() - t, o[0].outputs[0].token_ids

        timed(1 + D)  # warm-up: allocator, kernels, graph capture
        best = min(timed(1 + D)[0] - timed(1)[0] for _ in range(args.repeats))
        outs[name] = timed(1 + D)[1]
        m = llm.spec_metrics() if kw.get("num_speculative_tokens") else {}
        graphs = llm.engine.runner.graphs
        rows[name] = dict(decode_tok_s=D / best, acceptance_length=m.get("acceptance_length"),
                          graphs=sorted(graphs.graphs) if graphs is not None else None)
        print(json.dumps({name: rows[name]}), flush=True)
    base = rows["plain graphs"]["decode_tok_s"]
    for r in rows.values():
        r["vs_plain_graphs"] = r["decode_tok_s"] / base
    results["gpu_mtp"] = dict(device=torch.cuda.get_device_name(), model=str(toy_dir), spec_tokens=k,
                              decode_tokens=D, rows=rows,
                              same_greedy_as_plain_graphs={n: o == outs["plain graphs"] for n, o in outs.items()})
    print(json.dumps(results["gpu_mtp"]), flush=True)
