"""Tensor / expert parallelism: decode throughput and weight bytes per rank, against one process.

Run the same script once per placement; each run appends one JSON line per batch size to --out:

    python benchmarks/bench_tp.py --threads 2                                   # one process, 2 threads
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --threads 1              # 2 ranks (TP), 1 thread each
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --threads 1 --ep         # 2 ranks, experts dealt out whole

The model is a random-init preset saved once to --workdir (greedy decoding with EOS ignored, so the work is the
same whatever the weights). Decode tok/s counts generated tokens over the time of the whole generate call minus
the time to the first token of a 1-token run (prefill), as bench_engine does for its decode rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="glm5-small")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=128, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=32, help="generated tokens per sequence")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ep", action="store_true", help="expert parallelism for the routed experts")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="runs/bench_tp")
    ap.add_argument("--out", default="benchmarks/tp.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from glm5.config import preset
    from glm5.engine import LLM, SamplingParams
    from glm5.model.transformer import GLM5ForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    path = Path(args.workdir) / args.preset
    if not (path / "config.json").exists():
        if world > 1:
            raise SystemExit(f"run once without torchrun first: it writes the checkpoint to {path}")
        GLM5ForCausalLM(preset(args.preset)).init_weights(0).save_pretrained(path)
    llm = LLM(str(path), tensor_parallel_size=world, enable_expert_parallel=args.ep and world > 1,
              max_num_seqs=max(args.batches), max_model_len=args.context + args.decode + 16,
              max_num_batched_tokens=max(args.batches) * args.context)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    vocab = llm.engine.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for batch in args.batches:
        prompts = [torch.randint(1, vocab, (args.context,), generator=g).tolist() for _ in range(batch)]

        def run(n):
            t = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - t

        run(2)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            best = min(best, run(args.decode + 1) - run(1))
        row = dict(preset=args.preset, world=world, expert_parallel=args.ep and world > 1, threads=args.threads,
                   batch=batch, context=args.context, decode_tokens=args.decode,
                   decode_tok_s=batch * args.decode / best, weight_bytes_per_rank=weight_bytes,
                   date=time.strftime("%Y-%m-%d %H:%M"), machine=os.uname().nodename)
        if rank == 0:
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
