"""``glm5 eval``: one model directory -> the numbers the GLM-5 article puts in its table.

* validation perplexity on a corpus' held-out split (default: the built-in English corpus), next to the
  unigram-entropy baseline of the same tokenisation;
* held-out verifiable-task accuracy with abstention and hallucination rates (wrong among answered), scored
  by the same reward code as RL (glm5.rl), with unanswerable questions in the mix;
* MTP speculative decoding: mean acceptance length with k drafts, over greedy answers to task prompts;
* decode throughput of our engine at batch 1, and a cost per million output tokens derived from it and a
  machine price per hour.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glm5.config import GLM5Config


@dataclass
class EvalConfig:
    data: list = field(default_factory=lambda: ["default"])  # corpus for validation perplexity
    seq_len: int = 256
    ppl_batches: int = 16
    batch_size: int = 8
    tasks: list = field(default_factory=lambda: ["arith"])  # task specs (glm5.rl.tasks)
    n_tasks: int = 100
    unanswerable_frac: float = 0.2
    task_seed: int = 12345  # held out: RL's default training seeds are small integers
    max_new_tokens: int = 96
    spec_tokens: int = 3
    spec_prompts: int = 16
    decode_tokens: int = 64
    price_per_hour: float = 0.10  # USD for the machine the numbers are measured on
    cache_dir: str | None = None
    skip: list = field(default_factory=list)  # any of: ppl, tasks, mtp, speed


def _load(model_dir: str | Path, device: str):
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.tokenizer import GLM5Tokenizer

    model = GLM5ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device=device).eval()
    tok = GLM5Tokenizer.from_pretrained(model_dir)
    return model, tok


@torch.no_grad()
def validation_perplexity(model, tokenizer, cfg: EvalConfig) -> dict:
    from glm5.data.loader import BatchLoader, PackedRows
    from glm5.data.tokenize import load_tokens, prepare_dataset, read_manifest
    from glm5.train.config import default_cache_dir

    ds = prepare_dataset(cfg.data, tokenizer, cfg.cache_dir or default_cache_dir())
    manifest = read_manifest(ds)
    val = load_tokens(ds, "val")
    seq = min(cfg.seq_len, model.config.max_position_embeddings, max(2, len(val) - 1))
    rows = PackedRows(val, seq, eos_id=manifest.get("eos_token_id"))
    loader = BatchLoader(rows, cfg.batch_size, seed=0, shuffle=False)
    total, n = 0.0, 0
    for b in loader.eval_batches(cfg.ppl_batches):
        b = b.to(model.device)
        out = model(b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask)
        total += float(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), b.labels.flatten(),
                                                         ignore_index=-100, reduction="sum"))
        n += b.n_tokens
    ce = total / max(1, n)
    base = manifest["unigram"]["val_cross_entropy"]
    return {"val_loss": ce, "val_perplexity": math.exp(ce), "val_tokens": n, "unigram_loss": base,
            "unigram_perplexity": math.exp(base)}


def task_metrics(model, tokenizer, cfg: EvalConfig) -> dict:
    from glm5.rl.evaluate import evaluate_model
    from glm5.rl.rollout import RolloutConfig
    from glm5.rl.tasks import make_task_set

    tasks = make_task_set(cfg.tasks, cfg.n_tasks, seed=cfg.task_seed, unanswerable_frac=cfg.unanswerable_frac)
    ro = RolloutConfig()
    ro.max_new_tokens = cfg.max_new_tokens
    met = evaluate_model(model, tokenizer, tasks, rollout=ro, copy_model=False,
                         engine_kwargs={"max_model_len": min(1024, model.config.max_position_embeddings)})
    keep = ("accuracy", "accuracy_ci", "abstention_rate", "hallucination_rate", "hallucination_rate_ci",
            "unanswerable_abstention_rate", "reward", "n", "n_answerable", "n_answered", "response_tokens")
    return {k: met[k] for k in keep if k in met}


def _prompts(tokenizer, n: int) -> list[list[int]]:
    from glm5.rl.tasks import build_messages, make_task_set

    tasks = make_task_set(["arith"], n, seed=777)
    return [tokenizer.apply_chat_template(build_messages(t), tokenize=True, add_generation_prompt=True) for t in tasks]


def mtp_acceptance(model, tokenizer, cfg: EvalConfig) -> dict:
    from glm5.engine import LLM, SamplingParams

    if model.config.num_nextn_predict_layers == 0:
        return {"mtp_acceptance_length": None}
    # The model's own greedy answers, ending at EOS as served: what follows an end of sequence is text no
    # draft (and no policy) was trained on, and once counted it dominated the measure.
    llm = LLM(model, tokenizer, max_num_seqs=4, max_model_len=min(1024, model.config.max_position_embeddings),
              num_speculative_tokens=cfg.spec_tokens)
    outs = llm.generate(_prompts(tokenizer, cfg.spec_prompts),
                        SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens), use_tqdm=False)
    m = llm.spec_metrics()
    return {"mtp_acceptance_length": m["acceptance_length"], "mtp_draft_tokens": cfg.spec_tokens,
            "mtp_acceptance_rate": m["acceptance_rate"],
            "mtp_decoded_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def decode_speed(model, tokenizer, cfg: EvalConfig) -> dict:
    from glm5.engine import LLM, SamplingParams

    llm = LLM(model, tokenizer, max_num_seqs=1, max_model_len=min(1024, model.config.max_position_embeddings))
    prompt = _prompts(tokenizer, 1)
    sp = SamplingParams(temperature=0.0, max_tokens=cfg.decode_tokens, ignore_eos=True)
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate(prompt, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = len(out[0].outputs[0].token_ids)
    tps = n / dt
    return {"decode_tokens_per_s": tps, "cost_per_million_output_tokens_usd": cfg.price_per_hour / (tps * 3600) * 1e6}


def evaluate(model_dir: str | Path, cfg: EvalConfig | None = None, device: str = "cpu", progress=print) -> dict:
    from glm5.info import model_stats

    cfg = cfg or EvalConfig()
    model, tok = _load(model_dir, device)
    st = model_stats(GLM5Config.from_pretrained(model_dir))
    res: dict = {"model": str(model_dir), "params_total": st["params_total_with_mtp"],
                 "params_activated": st["params_activated_per_token"], "config": asdict(cfg)}
    steps = [("ppl", validation_perplexity), ("tasks", task_metrics), ("mtp", mtp_acceptance), ("speed", decode_speed)]
    for name, fn in steps:
        if name in cfg.skip:
            continue
        t0 = time.time()
        res.update(fn(model, tok, cfg))
        progress(f"eval {name}: {time.time() - t0:.1f}s")
    return res


def _fmt(v, pct=False):
    if v is None:
        return "—"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:,.3g}" if isinstance(v, float) else f"{v:,}"


def _model_label(path: str) -> str:
    """A short name for a checkpoint directory. ``glm5 train``/``sft`` export to ``OUT/hf``, so a directory called
    ``hf`` is named with its parent (``sft/hf``): two such models would otherwise share one name."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name == "hf" and p.parent.name else (p.name or str(path))


def format_table(rows: list[dict]) -> str:
    """Markdown table in the spirit of the GLM-5 article's: one row per model."""
    head = ["model", "params (total / active)", "val ppl", "accuracy", "abstention", "hallucination",
            "MTP accept len", "decode tok/s", "$ / M output tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = r.get("accuracy_ci")
        acc = _fmt(r.get("accuracy"), pct=True) + (f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]" if ci else "")
        lines.append("| " + " | ".join([
            r.get("label") or _model_label(r["model"]), f"{r['params_total'] / 1e6:.1f}M / {r['params_activated'] / 1e6:.1f}M",
            _fmt(r.get("val_perplexity")), acc, _fmt(r.get("abstention_rate"), pct=True),
            _fmt(r.get("hallucination_rate"), pct=True), _fmt(r.get("mtp_acceptance_length")),
            _fmt(r.get("decode_tokens_per_s")), _fmt(r.get("cost_per_million_output_tokens_usd")),
        ]) + " |")
    return "\n".join(lines)
