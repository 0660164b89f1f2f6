"""Held-out evaluation of a policy on task sets, through our inference engine.

``evaluate_model(model, tokenizer, tasks)`` generates one answer per task (greedy by default, so the number is
deterministic) on a private engine over a copy of the model, scores it with the same reward function as RL, and
returns :func:`glm5.rl.metrics.rollout_metrics` (accuracy with a 95% Wilson interval, abstention rate,
hallucination rate with its interval, ...). ``compare`` reports the before/after difference of two evaluations
with a normal-approximation 95% interval for the difference of two independent proportions.
"""

from __future__ import annotations

import copy
import math

from glm5.rl.metrics import rollout_metrics
from glm5.rl.rollout import RolloutConfig, RolloutEngine
from glm5.rl.sample import Sample
from glm5.rl.weight_sync import clone_model

__all__ = ["evaluate_model", "compare", "diff_ci"]


def evaluate_model(model, tokenizer, tasks: list[dict], *, rollout: RolloutConfig | None = None,
                   temperature: float = 0.0, engine_kwargs: dict | None = None, copy_model: bool = True,
                   return_samples: bool = False):
    from glm5.engine import build_engine

    cfg = copy.deepcopy(rollout) if rollout is not None else RolloutConfig()
    cfg.temperature = temperature
    m = clone_model(model) if copy_model else model
    kw = {"max_num_seqs": 32, "max_model_len": 1024, **(engine_kwargs or {})}
    engine = build_engine(m, tokenizer, **kw)
    ro = RolloutEngine(engine, tokenizer, cfg)
    samples = [Sample(prompt_ids=ro.make_prompt(t), task=t, group_id=i, index=0, max_new_tokens=cfg.max_new_tokens)
               for i, t in enumerate(tasks)]
    done = ro.generate(samples)
    met = rollout_metrics(done)
    return (met, done) if return_samples else met


def diff_ci(k1: int, n1: int, k2: int, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """Difference p2 − p1 of two proportions and its 95% (Wald) interval."""
    if n1 == 0 or n2 == 0:
        return (0.0, 0.0, 0.0)
    p1, p2 = k1 / n1, k2 / n2
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    d = p2 - p1
    return (d, d - z * se, d + z * se)


def compare(before: dict, after: dict) -> dict:
    """Before/after deltas (after − before) with 95% intervals for accuracy and hallucination rate."""
    acc = diff_ci(before["correct"], before["n_answerable"], after["correct"], after["n_answerable"])
    hal = diff_ci(before["wrong_answered"], before["n_answered"], after["wrong_answered"], after["n_answered"])
    return {"accuracy_delta": acc[0], "accuracy_delta_ci": [acc[1], acc[2]],
            "hallucination_delta": hal[0], "hallucination_delta_ci": [hal[1], hal[2]],
            "reward_delta": after["reward"] - before["reward"],
            "abstention_delta": after["abstention_rate"] - before["abstention_rate"]}
