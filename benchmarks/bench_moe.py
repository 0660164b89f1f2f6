"""Routed-expert MoE at decode sizes: the model's grouped GEMM against the two "touch only the selected
experts" alternatives, on CPU, fp32, one thread.

* ``model``: what ``glm5.model.moe.Experts`` runs without autograd on CPU: a loop over the non-empty experts
  when at most a quarter of them have tokens (decode of one or two tokens), else ``torch._grouped_mm``;
* ``grouped``: always ``torch._grouped_mm`` over the tokens sorted by expert (the model's path before the
  eleventh session, and its path under autograd);
* ``gather_bmm``: gather the N·k selected experts' weights, one batched matrix-vector product per slot;
* ``loop_unique``: a Python loop over ``ids.unique()``, one ``F.linear`` pair per active expert.

All four are checked against each other before timing. Usage:
    python benchmarks/bench_moe.py [--presets glm5-tiny glm5-small] [--tokens 1 4 16 64] [--repeats 50] [--glm5-routing]
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glm5.config import preset  # noqa: E402
from glm5.model.moe import MoE, expert_counts  # noqa: E402


def grouped_only(ex, x, ids, w):
    N, k = ids.shape
    order = ids.reshape(-1).argsort(stable=True)
    offs = expert_counts(ids, ex.n_experts).cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(x[order // k], ex.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, -1)
    ys = torch._grouped_mm(F.silu(gate) * up, ex.down_proj.transpose(-2, -1), offs=offs)
    out = torch.empty_like(ys)
    out[order] = ys.float() * w.reshape(-1)[order, None]
    return out.view(N, k, -1).sum(1)


def gather_bmm(ex, x, ids, w):
    N, k = ids.shape
    flat = ids.reshape(-1)
    xs = x.repeat_interleave(k, 0)[:, :, None]  # [N*k,H,1]
    gate, up = torch.bmm(ex.gate_up_proj[flat], xs).squeeze(-1).chunk(2, -1)  # weights gathered: [N*k,2I,H]
    y = torch.bmm(ex.down_proj[flat], (F.silu(gate) * up)[:, :, None]).squeeze(-1)  # [N*k,H]
    return (y.float() * w.reshape(-1, 1)).view(N, k, -1).sum(1)


def loop_unique(ex, x, ids, w):
    out = torch.zeros(x.shape[0], ex.hidden)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        gate, up = F.linear(x[tok], ex.gate_up_proj[e]).chunk(2, -1)
        out.index_add_(0, tok, F.linear(F.silu(gate) * up, ex.down_proj[e]) * w[tok, slot, None])
    return out


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=["glm5-tiny", "glm5-small"])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 16, 64])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--glm5-routing", action="store_true",
                    help="also glm5-small's expert shapes with GLM-5's routing: 256 experts, top-8 (one group)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    cols = ("model", "grouped", "gather_bmm", "loop_unique")
    print("| preset | tokens | " + " | ".join(f"{c} ms" for c in cols) + " |\n|---|---:|" + "---:|" * len(cols))
    cases = [(name, preset(name)) for name in args.presets]
    if args.glm5_routing:
        cases.append(("glm5-small, 256 experts top-8",
                      preset("glm5-small", n_routed_experts=256, num_experts_per_tok=8, n_group=1, topk_group=1)))
    for name, cfg in cases:
        moe = MoE(cfg).eval()
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        ex = moe.experts
        for n in args.tokens:
            x = torch.randn(n, cfg.hidden_size)
            with torch.no_grad():
                _, w, ids = moe.gate(x)
                ref = ex(x, ids, w)
                fns = {"model": lambda: ex(x, ids, w), "grouped": lambda: grouped_only(ex, x, ids, w),
                       "gather_bmm": lambda: gather_bmm(ex, x, ids, w),
                       "loop_unique": lambda: loop_unique(ex, x, ids, w)}
                for f in fns.values():
                    torch.testing.assert_close(f(), ref, rtol=1e-4, atol=1e-5)
                ms = {k: timed(f, args.repeats) for k, f in fns.items()}
            rows.append(dict(preset=name, tokens=n, experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok, **ms))
            cells = " | ".join(f"{ms[k]:.3f}" for k in cols)
            print(f"| {name} | {n} | {cells} |", flush=True)
    if args.out:
        meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
                    machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                            f"torch {torch.__version__}")
        Path(args.out).write_text(json.dumps(dict(meta, rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
