"""``glm5 sample``: build a preset with random weights (or load a checkpoint) and generate a few tokens.

A quick end-to-end check that the architecture runs on this machine (MLA, DSA, MoE, cached decode),
printing the token ids and decode speed. Real text generation is ``glm5 generate`` (glm5.engine).
"""

from __future__ import annotations

import time

import torch

from glm5 import GLM5ForCausalLM
from glm5.config import PRESETS, preset


def sample(target: str, prompt_len: int, new_tokens: int, seed: int) -> dict:
    torch.manual_seed(seed)
    if target in PRESETS:
        model = GLM5ForCausalLM(preset(target)).init_weights(seed).eval()
    else:
        model = GLM5ForCausalLM.from_pretrained(target).eval()
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens)
    dt = time.perf_counter() - t0
    return {"prompt": prompt[0].tolist(), "generated": out[0, prompt_len:].tolist(), "seconds": dt,
            "tokens_per_s": new_tokens / dt, "sparse": prompt_len + new_tokens > cfg.index_topk}


def add_parser(sub):
    p = sub.add_parser("sample", help="random-init (or checkpoint) smoke generation: token ids and speed")
    p.add_argument("target", nargs="?", default="glm5-nano", help="preset name or checkpoint dir (default glm5-nano)")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)

    def run(a):
        r = sample(a.target, a.prompt_len, a.new_tokens, a.seed)
        print(f"prompt ids   : {r['prompt']}")
        print(f"generated ids: {r['generated']}")
        print(f"{len(r['generated'])} tokens in {r['seconds']:.2f}s ({r['tokens_per_s']:.1f} tok/s); "
              f"DSA sparse selection active: {r['sparse']}")

    p.set_defaults(func=run)
