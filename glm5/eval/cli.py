"""``glm5 eval --model DIR``: perplexity, task accuracy / abstention / hallucination, MTP acceptance, speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: perplexity, task accuracy, hallucination, MTP, speed")
    p.add_argument("--model", required=True, action="append",
                   help="checkpoint directory (config, safetensors, tokenizer); repeat to compare models")
    p.add_argument("--data", nargs="+", default=["default"], help="corpus for validation perplexity")
    p.add_argument("--tasks", nargs="+", default=["arith"], help="task specs (see glm5.rl.tasks)")
    p.add_argument("--n-tasks", type=int, default=100)
    p.add_argument("--unanswerable-frac", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--ppl-batches", type=int, default=16)
    p.add_argument("--spec-tokens", type=int, default=3, help="MTP draft tokens per verification")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--price-per-hour", type=float, default=0.10, help="machine price (USD/h) for the cost column")
    p.add_argument("--skip", nargs="*", default=[], choices=["ppl", "tasks", "mtp", "speed"])
    p.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default: $GLM5_CACHE or ~/.cache/glm5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.set_defaults(func=_run)


def _run(a) -> int:
    from glm5.eval.evaluate import EvalConfig, evaluate, format_table

    cfg = EvalConfig(data=a.data, tasks=a.tasks, n_tasks=a.n_tasks, unanswerable_frac=a.unanswerable_frac,
                     max_new_tokens=a.max_new_tokens, ppl_batches=a.ppl_batches, spec_tokens=a.spec_tokens,
                     decode_tokens=a.decode_tokens, price_per_hour=a.price_per_hour, skip=a.skip,
                     cache_dir=a.cache_dir)
    rows = []
    for m in a.model:
        if not (Path(m) / "config.json").exists():
            print(f"glm5 eval: {m} is not a checkpoint directory (no config.json)", file=sys.stderr)
            return 2
        rows.append(evaluate(m, cfg, device=a.device, progress=lambda s: print(s, file=sys.stderr)))
    print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    print(format_table(rows))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows if len(rows) > 1 else rows[0], indent=2) + "\n")
    return 0
