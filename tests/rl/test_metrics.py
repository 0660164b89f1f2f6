"""Metric definitions (accuracy, abstention, hallucination), intervals, paired before/after comparison, plots."""

import json

import pytest

from glm5.rl.evaluate import compare
from glm5.rl.metrics import MetricsLogger, plot_metrics, rollout_metrics, wilson_ci
from glm5.rl.rewards import abstention_reward
from glm5.rl.sample import Sample, Status

ANS = {"question": "Calculate 3 + 4.", "answer": "7", "answerable": True}
UNANS = {"question": "What is x?", "answer": None, "answerable": False}


def judged(text, task):
    s = Sample(prompt_ids=[1], task=task, status=Status.COMPLETED)
    s.append([2, 3], [-0.1, -0.1], trainable=True)
    r = abstention_reward(text, task)
    s.reward, s.reward_info = r.reward, r.to_dict()
    return s


def test_rollout_metric_definitions():
    samples = [judged("</think>7", ANS), judged("</think>7", ANS), judged("</think>8", ANS),
               judged("</think>I don't know.", ANS), judged("</think>I don't know.", UNANS), judged("</think>5", UNANS)]
    m = rollout_metrics(samples)
    assert m["accuracy"] == pytest.approx(2 / 4)  # correct / answerable
    assert m["abstention_rate"] == pytest.approx(1 / 4)  # IDK / answerable
    assert m["n_answered"] == 4 and m["wrong_answered"] == 2  # "8" and the answer to the unanswerable question
    assert m["hallucination_rate"] == pytest.approx(2 / 4)
    assert m["unanswerable_abstention_rate"] == pytest.approx(1 / 2)
    assert m["reward"] == pytest.approx((1 + 1 - 1 + 0 + 1 - 1) / 6)
    lo, hi = m["accuracy_ci"]
    assert lo < 0.5 < hi


def test_wilson_interval():
    lo, hi = wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(0, 0) == (0.0, 0.0)


def _eval(correct, answered, wrong):
    n = len(correct)
    return {"per_task": {"correct": correct, "answered": answered, "wrong": wrong, "abstained": [0] * n,
                         "reward": [c - w for c, w in zip(correct, wrong)], "answerable": [True] * n},
            "samples_per_task": 1}


def test_paired_comparison():
    n = 200
    before = _eval([1] * 60 + [0] * 140, [1] * n, [0] * 60 + [1] * 140)
    same = compare(before, before)
    assert same["accuracy_delta"] == 0 and same["accuracy_delta_ci"] == [0.0, 0.0]
    after = _eval([1] * 90 + [0] * 110, [1] * n, [0] * 90 + [1] * 110)  # 30 more right, none lost
    d = compare(before, after)
    assert d["accuracy_delta"] == pytest.approx(0.15)
    lo, hi = d["accuracy_delta_ci"]
    assert 0.09 < lo < 0.15 < hi < 0.21  # paired: only the 30 changed tasks vary
    assert d["hallucination_delta"] == pytest.approx(-0.15)


def test_logger_and_plot(tmp_path):
    lg = MetricsLogger(tmp_path, total_steps=3, progress=False)
    for step in range(3):
        lg.log({"step": step, "reward": 0.1 * step, "accuracy": 0.5, "staleness_hist": {0: 4, 1: 2}, "samples_per_s": 3.0})
    lg.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2] and "time_s" in recs[0]
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "rl.png")
    assert png is not None and png.stat().st_size > 1000


def test_soft_policy_warning_flags_samples_far_below_greedy():
    from glm5.rl.runner import soft_policy_warning

    # the second session's glm5-tiny SFT model: 43% greedy, 16% sampled at T = 1
    assert "16%" in soft_policy_warning(0.43, 0.16) and "43%" in soft_policy_warning(0.43, 0.16)
    assert soft_policy_warning(0.43, 0.30) is None  # within a factor of two: fine
    assert soft_policy_warning(0.10, 0.0) is None  # a model that cannot do the task: nothing to compare
    assert soft_policy_warning(None, 0.1) is None and soft_policy_warning(0.9, None) is None
