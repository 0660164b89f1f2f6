"""Held-out evaluation of a policy on task sets, through our inference engine.

``evaluate_model(model, tokenizer, tasks)`` generates ``samples`` answers per task (greedy by default, so the
number is deterministic; with ``temperature`` > 0 it is the sampled "mean@k" accuracy RL optimises) on a
private engine over a copy of the model, scores them with the same reward function as RL, and returns
:func:`glm5.rl.metrics.rollout_metrics` (accuracy with a 95% Wilson interval, abstention rate, hallucination
rate with its interval, ...) plus per-task counts (``per_task``) for paired comparisons.

``compare(before, after)`` reports after − before for accuracy, hallucination rate, abstention rate and reward
with 95% intervals from a paired bootstrap over tasks (the same tasks are evaluated twice, so pairing removes the
between-task variance; for sampled evaluation it also accounts for the samples of a task being correlated).
"""

from __future__ import annotations

import copy
import math

import numpy as np

from glm5.rl.metrics import rollout_metrics
from glm5.rl.rollout import RolloutConfig, RolloutEngine
from glm5.rl.sample import Sample
from glm5.rl.weight_sync import clone_model

__all__ = ["evaluate_model", "compare", "diff_ci"]


def evaluate_model(model, tokenizer, tasks: list[dict], *, rollout: RolloutConfig | None = None,
                   temperature: float = 0.0, samples: int = 1, seed: int = 1234, engine_kwargs: dict | None = None,
                   copy_model: bool = True, return_samples: bool = False):
    from glm5.engine import build_engine

    cfg = copy.deepcopy(rollout) if rollout is not None else RolloutConfig()
    cfg.temperature = temperature
    cfg.seed = seed
    k = samples if temperature > 0 else 1
    m = clone_model(model) if copy_model else model
    kw = {"max_num_seqs": 32, "max_model_len": 1024, **(engine_kwargs or {})}
    engine = build_engine(m, tokenizer, **kw)
    ro = RolloutEngine(engine, tokenizer, cfg)
    todo = [Sample(prompt_ids=ro.make_prompt(t), task=t, group_id=i, index=j, max_new_tokens=cfg.max_new_tokens)
            for i, t in enumerate(tasks) for j in range(k)]
    done = ro.generate(todo)
    met = rollout_metrics(done)
    n = len(tasks)
    correct, answered, wrong, abstained, reward = (np.zeros(n) for _ in range(5))
    for s in done:
        i = s.group_id
        info = s.reward_info
        correct[i] += bool(info.get("correct")) and s.task.get("answerable", True)
        answered[i] += bool(info.get("answered"))
        wrong[i] += bool(info.get("answered")) and not bool(info.get("correct"))
        abstained[i] += bool(info.get("abstained")) and s.task.get("answerable", True)
        reward[i] += float(s.reward or 0.0)
    met["per_task"] = {"correct": correct.tolist(), "answered": answered.tolist(), "wrong": wrong.tolist(),
                       "abstained": abstained.tolist(), "reward": reward.tolist(),
                       "answerable": [bool(t.get("answerable", True)) for t in tasks]}
    met["temperature"] = temperature
    met["samples_per_task"] = k
    return (met, done) if return_samples else met


def diff_ci(k1: int, n1: int, k2: int, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """Difference p2 − p1 of two independent proportions and its 95% (Wald) interval."""
    if n1 == 0 or n2 == 0:
        return (0.0, 0.0, 0.0)
    p1, p2 = k1 / n1, k2 / n2
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    d = p2 - p1
    return (d, d - z * se, d + z * se)


def _stats(pt: dict, idx: np.ndarray) -> dict:
    ans = np.asarray(pt["answerable"], dtype=bool)[idx]
    c, a, w = (np.asarray(pt[k])[idx] for k in ("correct", "answered", "wrong"))
    ab, r = np.asarray(pt["abstained"])[idx], np.asarray(pt["reward"])[idx]
    n_ans = ans.sum()
    return {"accuracy": c.sum() / n_ans if n_ans else 0.0,
            "hallucination_rate": w.sum() / a.sum() if a.sum() else 0.0,
            "abstention_rate": ab.sum() / max(n_ans, 1),
            "reward": r.sum() / max(len(idx), 1)}


def compare(before: dict, after: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """After − before deltas with 95% paired-bootstrap intervals (over tasks)."""
    out = {}
    pb, pa = before.get("per_task"), after.get("per_task")
    keys = ("accuracy", "hallucination_rate", "abstention_rate", "reward")
    if pb is None or pa is None or len(pb["correct"]) != len(pa["correct"]):
        acc = diff_ci(before["correct"], before["n_answerable"], after["correct"], after["n_answerable"])
        hal = diff_ci(before["wrong_answered"], before["n_answered"], after["wrong_answered"], after["n_answered"])
        return {"accuracy_delta": acc[0], "accuracy_delta_ci": [acc[1], acc[2]], "hallucination_delta": hal[0],
                "hallucination_delta_ci": [hal[1], hal[2]], "reward_delta": after["reward"] - before["reward"],
                "abstention_delta": after["abstention_rate"] - before["abstention_rate"], "ci": "wald"}
    kb, ka = before.get("samples_per_task", 1), after.get("samples_per_task", 1)
    n = len(pb["correct"])

    def scaled(pt, k):
        return {**pt, **{x: (np.asarray(pt[x]) / k).tolist() for x in ("correct", "answered", "wrong", "abstained",
                                                                      "reward")}}

    pb, pa = scaled(pb, kb), scaled(pa, ka)
    full = np.arange(n)
    point = {k: _stats(pa, full)[k] - _stats(pb, full)[k] for k in keys}
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in keys}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        sb, sa = _stats(pb, idx), _stats(pa, idx)
        for k in keys:
            boots[k].append(sa[k] - sb[k])
    names = {"accuracy": "accuracy_delta", "hallucination_rate": "hallucination_delta",
             "abstention_rate": "abstention_delta", "reward": "reward_delta"}
    for k in keys:
        lo, hi = np.percentile(boots[k], [2.5, 97.5])
        out[names[k]] = float(point[k])
        out[names[k] + "_ci"] = [float(lo), float(hi)]
    out["ci"] = "paired bootstrap over tasks, 95%"
    return out
