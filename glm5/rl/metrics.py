"""RL metrics: per-batch rollout statistics, confidence intervals, JSONL logging, PNG plots, progress bar.

Definitions (over the samples of a batch or an evaluation set; "answered" = gave an answer that is not an
abstention):

* ``accuracy``            correct answers / answerable questions
* ``abstention_rate``     "I don't know" / answerable questions
* ``hallucination_rate``  wrong answers / answered questions, unanswerable questions included (answering an
                          unanswerable question is always wrong)
* ``unanswerable_abstention_rate``  "I don't know" / unanswerable questions
* ``reward``              mean reward; ``truncation_rate``; ``response_tokens`` mean
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

__all__ = ["rollout_metrics", "wilson_ci", "MetricsLogger", "plot_metrics", "read_jsonl"]


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def rollout_metrics(samples, prefix: str = "") -> dict:
    n = len(samples)
    if n == 0:
        return {}
    ans = [s for s in samples if s.task.get("answerable", True)]
    una = [s for s in samples if not s.task.get("answerable", True)]
    info = lambda s, k: bool(s.reward_info.get(k, False))  # noqa: E731
    correct = sum(info(s, "correct") for s in ans)
    abst = sum(info(s, "abstained") for s in ans)
    answered = [s for s in samples if info(s, "answered")]
    wrong_answered = sum(1 for s in answered if not info(s, "correct"))
    out = {
        "reward": sum(float(s.reward or 0.0) for s in samples) / n,
        "n": n, "n_answerable": len(ans), "n_unanswerable": len(una),
        "accuracy": correct / len(ans) if ans else 0.0,
        "correct": correct,
        "abstention_rate": abst / len(ans) if ans else 0.0,
        "hallucination_rate": wrong_answered / len(answered) if answered else 0.0,
        "n_answered": len(answered), "wrong_answered": wrong_answered,
        "unanswerable_abstention_rate": (sum(info(s, "abstained") for s in una) / len(una)) if una else 0.0,
        "truncation_rate": sum(1 for s in samples if s.status.value == "truncated") / n,
        "response_tokens": sum(s.response_length for s in samples) / n,
        "tool_calls": sum(s.tool_calls for s in samples) / n,
    }
    steps = sum(s.spec_verify_steps for s in samples)
    if steps:  # MTP speculative rollouts: tokens per verification step, the bonus token included
        out["spec_acceptance_length"] = (sum(s.spec_accepted_tokens for s in samples) + steps) / steps
    lo, hi = wilson_ci(correct, len(ans))
    out["accuracy_ci"] = [lo, hi]
    lo, hi = wilson_ci(wrong_answered, len(answered))
    out["hallucination_rate_ci"] = [lo, hi]
    return {prefix + k: v for k, v in out.items()}


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Appends one JSON object per step to ``out/metrics.jsonl``; optional tqdm progress bar."""

    def __init__(self, out_dir: str | os.PathLike | None, total_steps: int = 0, progress: bool = True,
                 start_step: int = 0):
        """``start_step`` > 0: a resumed run; the records of its first ``start_step`` steps are kept in the file."""
        self.out = Path(out_dir) if out_dir else None
        self.path = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.path = self.out / "metrics.jsonl"
            if start_step and self.path.exists():  # drop any steps logged after the checkpoint, keep the rest
                kept = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                        and json.loads(ln).get("step", 0) < start_step]
                self.path.write_text("".join(ln + "\n" for ln in kept))
            else:
                self.path.write_text("")
        self.bar = None
        if progress and total_steps:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="rl", unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.t0 = time.perf_counter()
        self.records: list[dict] = []

    def log(self, rec: dict) -> None:
        rec = {"time_s": round(time.perf_counter() - self.t0, 3), **rec}
        self.records.append(rec)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, default=_jsonable) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            post = {k: rec[k] for k in ("reward", "accuracy", "hallucination_rate", "samples_per_s") if k in rec}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in post.items()})

    def write_json(self, name: str, obj) -> None:
        if self.out is not None:
            (self.out / name).write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "value"):
        return x.value
    return str(x)


_PANELS = [
    ("reward", "reward"),
    ("accuracy", "accuracy (train batches)"),
    ("hallucination_rate", "hallucination rate"),
    ("abstention_rate", "abstention rate"),
    ("samples_per_s", "trained samples / s"),
    ("trainer_idle_frac", "trainer idle fraction"),
    ("logprob_gap_mean", "|log π_train − log π_rollout|"),
    ("staleness_mean", "staleness (versions)"),
]


def plot_metrics(jsonl_path, png_path, title: str = "") -> Path | None:
    """A grid of the main curves plus the staleness histogram; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [r for r in read_jsonl(jsonl_path) if "step" in r]
    if not recs:
        return None
    panels = list(_PANELS)
    if any("spec_acceptance_length" in r for r in recs):  # speculative rollouts
        panels.append(("spec_acceptance_length", "MTP acceptance length (rollouts)"))
    rows = -(-(len(panels) + 1) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.4 * rows))
    axes = axes.ravel()
    for ax in axes[len(panels) + 1:]:
        ax.axis("off")
    steps = [r["step"] for r in recs]
    for ax, (key, label) in zip(axes, panels):
        ys = [(s, r[key]) for s, r in zip(steps, recs) if isinstance(r.get(key), (int, float))]
        if ys:
            ax.plot([a for a, _ in ys], [b for _, b in ys], marker=".", lw=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    hist = recs[-1].get("staleness_hist") or {}
    ax = axes[len(panels)]
    if hist:
        ks = sorted(int(k) for k in hist)
        ax.bar(ks, [hist[str(k)] if str(k) in hist else hist[k] for k in ks])
    ax.set_title("staleness histogram (consumed samples)", fontsize=10)
    ax.set_xlabel("versions behind")
    fig.suptitle(title or str(jsonl_path))
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
