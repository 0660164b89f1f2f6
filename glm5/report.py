"""The speedrun report: ``OUT/report.md`` with PNG plots, stage wall times, evaluation and ``glm5 info``.

Plots (each skipped cleanly if its data is absent):
* ``loss.png``: training cross-entropy of every stage on one global step axis, with validation points;
* ``balance.png``: expert-load imbalance (mean max-violation over MoE layers) per step;
* ``indexer_kl.png``: DSA indexer KL during the warm-up and sparse stages;
* ``rl.png``: RL reward, accuracy and hallucination rate per step;
* ``attention_cost.png``: attention FLOPs per decoded token, sparse (DSA) vs dense MLA, for the GLM-5
  config over context length (computed from the config: a property of the architecture).
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN_STAGES = ("pretrain", "indexer_warmup", "sparse", "sft")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_cost_per_token(cfg, context: int, sparse: bool) -> float:
    """FLOPs of one decoded token's attention over ``context`` keys, all layers, absorbed MLA.

    Scores and value mixing in latent space: 2·h·(r+d_r)·k + 2·h·r·k with k keys attended; DSA attends
    k = min(context, index_topk) and adds the indexer: 2·n_i·d_i·context (scores) + n_i·context (weighting).
    Projections (independent of context) are excluded."""
    h, r, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    k = min(context, cfg.index_topk) if sparse else context
    attn = 2 * h * (r + dr) * k + 2 * h * r * k
    idx = (2 * cfg.index_n_heads * cfg.index_head_dim * context + 2 * cfg.index_n_heads * context) if sparse else 0
    return float(cfg.num_hidden_layers * (attn + idx))


def plot_attention_cost(path: Path) -> dict:
    from glm5.config import preset

    cfg = preset("glm5")
    ctx = [2 ** i for i in range(10, 18)] + [cfg.max_position_embeddings]
    dense = [attention_cost_per_token(cfg, c, False) for c in ctx]
    sparse = [attention_cost_per_token(cfg, c, True) for c in ctx]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(ctx, dense, "o-", label="dense MLA")
    ax.loglog(ctx, sparse, "o-", label=f"DSA (top-{cfg.index_topk} + indexer)")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("attention FLOPs per decoded token")
    ax.set_title("GLM-5 attention cost per token")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    i32 = ctx.index(32768)
    return {"ratio_at_32k": dense[i32] / sparse[i32], "ratio_at_max": dense[-1] / sparse[-1]}


def _train_series(out: Path):
    series, offset = {}, 0
    for stage in TRAIN_STAGES:
        recs = _read_jsonl(out / stage / "metrics.jsonl")
        tr = [r for r in recs if r.get("kind") == "train"]
        ev = [r for r in recs if r.get("kind") == "eval"]
        series[stage] = {"train": tr, "eval": ev, "offset": offset}
        offset += max((r["step"] for r in tr), default=0)
    return series


def plot_training(out: Path, figdir: Path) -> list[str]:
    plt = _plt()
    series = _train_series(out)
    made = []
    specs = [("loss.png", "ce", "training cross-entropy", True), ("balance.png", "balance", "expert load max-violation", False),
             ("indexer_kl.png", "indexer_kl", "DSA indexer KL(attention ‖ indexer)", False)]
    for name, key, title, with_eval in specs:
        fig, ax = plt.subplots(figsize=(7, 4))
        any_data = False
        for stage, s in series.items():
            xs, ys = [], []
            for r in s["train"]:
                v = r.get(key)
                if isinstance(v, dict):
                    v = v.get("max_vio")
                if v is not None:
                    xs.append(r["step"] + s["offset"])
                    ys.append(v)
            if xs:
                any_data = True
                ax.plot(xs, ys, label=stage, lw=1)
            if with_eval:
                ev = [(r["step"] + s["offset"], r["val_loss"]) for r in s["eval"] if r.get("val_loss") is not None]
                if ev:
                    ax.plot(*zip(*ev), "o", ms=3, label=f"{stage} (val)")
        if any_data:
            ax.set_xlabel("step (all stages)")
            ax.set_title(title)
            ax.legend(fontsize=7)
            ax.grid(True, alpha=0.3)
            fig.tight_layout()
            fig.savefig(figdir / name, dpi=110)
            made.append(name)
        plt.close(fig)
    recs = [r for r in _read_jsonl(out / "rl" / "metrics.jsonl") if "reward" in r]
    if recs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("reward", "accuracy", "hallucination_rate", "abstention_rate"):
            pts = [(i, r[key]) for i, r in enumerate(recs) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=key)
        ax.set_xlabel("RL step")
        ax.set_title("RL with the abstention reward")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(figdir / "rl.png", dpi=110)
        plt.close(fig)
        made.append("rl.png")
    return made


def _pct(v):
    return "—" if v is None else f"{100 * v:.1f}%"


def write_report(out: str | Path) -> Path:
    from glm5.eval.evaluate import format_table
    from glm5.info import format_table as info_table
    from glm5.info import info

    out = Path(out)
    figdir = out / "report_figures"
    figdir.mkdir(parents=True, exist_ok=True)
    made = plot_training(out, figdir)
    cost = plot_attention_cost(figdir / "attention_cost.png")
    made.append("attention_cost.png")
    lines = ["# glm5 speedrun report", ""]
    meta = json.loads((out / "speedrun.json").read_text()) if (out / "speedrun.json").exists() else {}
    lines += [f"Preset: `{meta.get('preset', '?')}`; model preset `{meta.get('settings', {}).get('model', '?')}`.", ""]
    lines += ["## Stages", "", "| stage | wall time | notes |", "|---|---:|---|"]
    for stage in ("tokenizer", *TRAIN_STAGES, "rl", "mtp", "eval", "fp8"):
        f = out / stage / "DONE.json"
        if not f.exists():
            lines.append(f"| {stage} | — | not run |")
            continue
        d = json.loads(f.read_text())
        res = d.get("result") or {}
        note = ""
        if stage in TRAIN_STAGES:
            fv = res.get("final_val") or {}
            parts = [f"{res.get('steps', '?')} steps"]
            if isinstance(fv.get("val_loss"), (int, float)):
                parts.append(f"val loss {fv['val_loss']:.3f}")
            if isinstance(fv.get("val_indexer_kl"), (int, float)):
                parts.append(f"indexer KL {fv['val_indexer_kl']:.3g}")
            if isinstance(res.get("unigram_baseline"), (int, float)):
                parts.append(f"unigram baseline {res['unigram_baseline']:.3f}")
            note = ", ".join(parts)
        elif stage == "mtp":
            fv = res.get("final_val") or {}
            note = "skipped (mtp_distill_steps = 0)" if res.get("skipped") else f"{res.get('steps', '?')} steps, policy frozen"
            if isinstance(fv.get("val_mtp_accept_len"), (int, float)):
                agree = ", ".join(f"{a:.0%}" for a in fv.get("val_mtp_agreement") or [])
                note += (f"; drafts agree with the policy's top-1 {agree} (steps 1…), teacher-forced acceptance "
                         f"estimate {fv['val_mtp_accept_len']:.2f}")
        elif stage == "fp8" and res.get("fp8_bytes"):
            note = f"FP8 {res['fp8_bytes']:,} B = {res['fp8_bytes'] / max(1, res['bf16_or_fp32_bytes']):.2f}× the exported checkpoint"
        elif stage == "tokenizer":
            note = f"vocab {res.get('vocab_size')}"
        lines.append(f"| {stage} | {d['wall_s']:.1f}s | {note} |")
    ev_path = out / "eval" / "eval.json"
    if ev_path.exists():
        rows = json.loads(ev_path.read_text())
        lines += ["", "## Evaluation (SFT model vs final RL model)", "", format_table(rows), ""]
    samples = out / "eval" / "samples.json"
    if samples.exists():
        sm = json.loads(samples.read_text())
        lines += ["## Samples", "", "Pretrained base (after sparse training), T = 0.8, top-p 0.95:", ""]
        for text in sm.get("base", []):
            lines += ["```", text.strip(), "```", ""]
        lines += ["Final model, chat template, greedy (the raw output, reasoning included):", ""]
        for qa in sm.get("chat", []):
            lines += [f"* **{qa['question']}** → `{' '.join(qa['answer'].split())}`"]
        lines += [""]
    rl = out / "rl" / "DONE.json"
    if rl.exists():
        r = json.loads(rl.read_text())["result"]
        b, a, dl = r.get("before") or {}, r.get("after") or {}, r.get("delta") or {}
        if a:
            lines += ["## RL (held-out tasks, before → after)", "",
                      f"- accuracy {_pct(b.get('accuracy'))} → {_pct(a.get('accuracy'))}"
                      + (f" (Δ 95% CI {dl['accuracy_delta_ci'][0]:+.3f} … {dl['accuracy_delta_ci'][1]:+.3f})" if dl else ""),
                      f"- hallucination rate {_pct(b.get('hallucination_rate'))} → {_pct(a.get('hallucination_rate'))}",
                      f"- abstention rate {_pct(b.get('abstention_rate'))} → {_pct(a.get('abstention_rate'))}", ""]
    lines += ["## Plots", ""] + [f"![{m}](report_figures/{m})" for m in made]
    lines += ["", f"DSA attention cost per decoded token for the full GLM-5 config: {cost['ratio_at_32k']:.1f}× cheaper "
                  f"than dense at 32K context, {cost['ratio_at_max']:.1f}× at {202752:,}.", ""]
    final = out / "final"
    if (final / "config.json").exists():
        lines += ["## Final model (`glm5 info`)", "", "```", info_table(info(str(final))), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
