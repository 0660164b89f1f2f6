"""FP8 KV cache vs the model-dtype cache on a trained model: fidelity, greedy agreement, speed and capacity.

    python3 benchmarks/bench_kv_fp8.py --model runs/speedrun_cpu_s11/sparse/hf --out benchmarks/kv_fp8.json

The same engine settings with ``kv_cache_dtype="auto"`` (fp32 on CPU: outputs equal the model's) and ``"fp8"``
(GLM-5's serving layouts, glm5/engine/kv_quant.py), on snippets of the default corpus long enough that DSA's top-k
selects (prompts longer than the model's index_topk):
* teacher-forced: the log-probability of every prompt token (``prompt_logprobs``), so the perplexity of each cache,
  the mean and largest change per token, and how often the most likely token is the same;
* greedy continuations: how many are identical, and their mean common prefix;
* time to decode them (batch 1 and all prompts at once, the two caches alternating) and cache capacity for 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import _corpus_prompts  # noqa: E402

from glm5.engine import LLM, SamplingParams  # noqa: E402


def _token_logprobs(out) -> tuple[list[float], list[int]]:
    """(log p of each prompt token after the first, the most likely token at each of those positions)."""
    lps, tops = [], []
    for tok, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        lps.append(entry[tok])
        tops.append(max(entry, key=entry.get))
    return lps, tops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained checkpoint with its tokenizer.json")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the result to this JSON list")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = _corpus_prompts(args.model, args.prompts, args.prompt_tokens)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    max_len = args.prompt_tokens + args.decode_tokens + 8
    llms = {d: LLM(args.model, kv_cache_dtype=d, max_model_len=max_len, max_num_seqs=args.prompts,
                   kv_cache_memory=1 << 30, enable_prefix_caching=False) for d in ("auto", "fp8")}
    cfg = llms["auto"].engine.model.config
    row = dict(model=args.model, prompts=args.prompts, prompt_tokens=args.prompt_tokens, index_topk=cfg.index_topk,
               decode_tokens=args.decode_tokens, threads=args.threads,
               date=time.strftime("%Y-%m-%d %H:%MZ", time.gmtime()))
    for d, llm in llms.items():  # capacity of the same 1 GiB budget
        bm = llm.engine.block_manager
        row[f"tokens_per_gib_{d}"] = (bm.num_blocks - 1) * bm.block_size

    # teacher-forced fidelity
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    lp, top = {}, {}
    for d, llm in llms.items():
        outs = llm.generate(reqs, score, use_tqdm=False)
        pairs = [_token_logprobs(o) for o in outs]
        lp[d] = torch.tensor([x for a, _ in pairs for x in a], dtype=torch.float64)
        top[d] = [x for _, b in pairs for x in b]
    diff = (lp["fp8"] - lp["auto"]).abs()
    row.update(ppl_auto=math.exp(-lp["auto"].mean().item()), ppl_fp8=math.exp(-lp["fp8"].mean().item()),
               mean_abs_logprob_change=diff.mean().item(), max_abs_logprob_change=diff.max().item(),
               top1_agreement=sum(a == b for a, b in zip(top["auto"], top["fp8"])) / len(top["auto"]))

    # greedy continuations and decode time, the two caches alternating
    greedy = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    seqs = {d: [] for d in llms}
    t1 = {d: 0.0 for d in llms}
    for r in reqs:
        for d, llm in llms.items():
            t = time.perf_counter()
            seqs[d].append(llm.generate([r], greedy, use_tqdm=False)[0].outputs[0].token_ids)
            t1[d] += time.perf_counter() - t
    tb = {}
    for d, llm in llms.items():
        t = time.perf_counter()
        llm.generate(reqs, greedy, use_tqdm=False)
        tb[d] = time.perf_counter() - t

    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))

    row.update(greedy_identical=sum(a == b for a, b in zip(seqs["auto"], seqs["fp8"])),
               mean_common_prefix=sum(prefix(a, b) for a, b in zip(seqs["auto"], seqs["fp8"])) / len(reqs),
               batch1_seconds_auto=t1["auto"], batch1_seconds_fp8=t1["fp8"],
               batched_seconds_auto=tb["auto"], batched_seconds_fp8=tb["fp8"])
    print(json.dumps(row), flush=True)
    if args.out:
        path = Path(args.out)
        runs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(runs + [row], indent=1) + "\n")
        print(f"appended this run to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
