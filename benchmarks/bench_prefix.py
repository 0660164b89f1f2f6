"""Groups of identical prompts, as an RL rollout (GRPO groups) or ``n > 1`` sends them: what sharing the prompt's
prefix-cache blocks within a step saves, against the same engine with prefix caching off (what every sibling
admitted in one step used to cost).

    python3 benchmarks/bench_prefix.py --preset glm5-small --prompt-lens 64 256 1024 --group-size 8 --groups 4
    python3 benchmarks/bench_prefix.py --preset glm5-small --beam 4 --prompt-lens 400 --max-tokens 16

``--beam W``: ``LLM.beam_search`` instead, which submits every live beam as a one-token request each step, so
the prefix cache must serve what the previous step computed. Beams are not checked for equality: a random model's
candidates are near-ties, which float rounding (a cache entry computed in another batch) may reorder; the row
gives each engine's best cumulative log-probability instead.

Each run starts from an empty prefix cache, so only sharing inside the run counts. Sampled (temperature 1), seeded
per sample, so both engines must emit the same tokens: the script checks that. Process CPU time, best of
``--repeats``, the two engines interleaved. Results are appended to ``--out`` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm5 import GLM5ForCausalLM, preset  # noqa: E402
from glm5.engine import LLM, BeamSearchParams, SamplingParams  # noqa: E402


def _requests(groups: int, G: int, P: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab, (groups, P), generator=g).tolist()
    reqs = [p for p in prompts for _ in range(G)]
    return reqs


def _run(llm: LLM, reqs, params) -> tuple[float, list, int]:
    llm.engine.reset_prefix_cache()
    t = time.process_time()
    outs = llm.generate(reqs, params, use_tqdm=False)
    return time.process_time() - t, [o.outputs[0].token_ids for o in outs], sum(o.num_cached_tokens for o in outs)


def _run_beam(llm: LLM, reqs, width: int, max_tokens: int) -> tuple[float, list, int]:
    llm.engine.reset_prefix_cache()
    hits = llm.engine.block_manager.prefix_hits
    t = time.process_time()
    outs = llm.beam_search([{"prompt_token_ids": p} for p in reqs],
                           BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True))
    return (time.process_time() - t, [[(s.tokens, round(s.cum_logprob, 4)) for s in o.sequences] for o in outs],
            llm.engine.block_manager.prefix_hits - hits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm5-small")
    ap.add_argument("--model", default=None, help="a checkpoint directory instead of a random --preset model")
    ap.add_argument("--prompt-lens", type=int, nargs="*", default=[64, 256, 1024])
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--spec-tokens", type=int, default=0, help="MTP drafts (0: none)")
    ap.add_argument("--spec-disable-batch-size", type=int, default=0)
    ap.add_argument("--beam", type=int, default=0, metavar="W", help="beam search of width W over --groups prompts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).with_name("prefix.jsonl")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model:
        model, name = a.model, a.model
        vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    else:
        cfg = preset(a.preset)
        model, name, vocab = GLM5ForCausalLM(cfg).init_weights(0).eval(), a.preset, cfg.vocab_size
    B = a.groups * (a.group_size if not a.beam else 2 * a.beam)
    kw = dict(device="cpu", dtype=torch.float32, max_num_seqs=B, max_model_len=max(a.prompt_lens) + a.max_tokens + 8,
              max_num_batched_tokens=max(4096, B * max(a.prompt_lens)), num_speculative_tokens=a.spec_tokens,
              spec_disable_batch_size=a.spec_disable_batch_size)
    engines = {"shared": LLM(model, **kw), "off": LLM(model, enable_prefix_caching=False, **kw)}
    rows = []
    for P in a.prompt_lens:
        reqs = _requests(a.groups, 1 if a.beam else a.group_size, P, vocab, seed=P)
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=a.max_tokens, ignore_eos=True)
                  for i in range(B)]
        best = {k: float("inf") for k in engines}
        toks, cached = {}, {}
        for _ in range(a.repeats):
            for k, llm in engines.items():
                dt, toks[k], cached[k] = (_run_beam(llm, reqs, a.beam, a.max_tokens) if a.beam
                                          else _run(llm, reqs, params))
                best[k] = min(best[k], dt)
        row = dict(date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                   machine=platform.processor() or platform.machine(),
                   cpus=os.cpu_count(), threads=a.threads, torch=torch.__version__, model=name, prompt_len=P,
                   group_size=None if a.beam else a.group_size, groups=a.groups, beam_width=a.beam,
                   max_tokens=a.max_tokens, spec_tokens=a.spec_tokens,
                   **({"prefix_hit_tokens": cached} if a.beam else
                      {"prompt_tokens": B * P, "prompt_tokens_computed": {k: B * P - cached[k] for k in engines}}),
                   cpu_s={k: round(v, 3) for k, v in best.items()},
                   **({} if a.beam else {"samples_per_s": {k: round(B / v, 2) for k, v in best.items()}}),
                   speedup=round(best["off"] / best["shared"], 2), same_tokens=toks["shared"] == toks["off"])
        if a.beam:
            row["best_cum_logprob"] = {k: [o[0][1] for o in v] for k, v in toks.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0 if a.beam or all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
