"""The server's request-level logits processors (logit_bias, penalties, min_p, banned ids)."""

from __future__ import annotations

import math

import pytest
import torch

from glm5.serve.processors import ban_tokens, bias_processor, min_p_processor


def test_ban_and_bias():
    logits = torch.zeros(10)
    assert torch.isinf(ban_tokens([3, 99])([], logits)[3])
    p = bias_processor({2: 5.0}, presence=1.0, frequency=0.5)
    out = p([4, 4, 7], logits)
    assert out[2] == 5.0 and out[4] == pytest.approx(-2.0) and out[7] == pytest.approx(-1.5) and out[0] == 0
    assert bias_processor(None) is None


def test_min_p_keeps_tokens_within_the_ratio_of_the_top_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]))
    out = min_p_processor(0.25, temperature=1.0)([], logits)
    assert torch.isfinite(out[:2]).all() and torch.isinf(out[2:]).all()  # 0.1 < 0.25 * 0.5
    # the ratio applies to the tempered distribution: at T=0.5 p_i/p_max = (0.3/0.5)**2 = 0.36 still >= 0.25
    out = min_p_processor(0.25, temperature=0.5)([], logits)
    assert torch.isfinite(out[:2]).all() and math.isinf(out[2].item())
    # at T=2 the tempered ratio of 0.1 is (0.1/0.5)**0.5 = 0.45 >= 0.25: kept, unlike at T=1
    assert math.isfinite(min_p_processor(0.25, temperature=2.0)([], logits)[2].item())
