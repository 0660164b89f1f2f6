"""The request-level logits processors (logit_bias, penalties, min_p, allowed / banned ids) and the
SamplingParams fields that ask for them."""

from __future__ import annotations

import math

import pytest
import torch

from glm5.engine.processors import ban_tokens, bias_processor, min_p_processor


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


def test_sampling_params_fields_build_the_same_processors_in_the_engine(nano):
    """vLLM's SamplingParams fields (penalties, logit_bias, min_p, allowed_token_ids) on LLM.generate equal passing
    the processors by hand; the caller's params are not modified."""
    from glm5.engine import LLM, SamplingParams

    from .conftest import prompts

    llm = LLM(nano, block_size=4)
    p = prompts([6], seed=2)[0]
    base = dict(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    fields = SamplingParams(**base, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3, min_p=0.05,
                            logit_bias={7: 2.0})
    by_hand = SamplingParams(**base, logits_processors=[bias_processor({7: 2.0}, 0.5, 0.3, 1.3),
                                                        min_p_processor(0.05, 0.8)])
    a, b = llm.generate([p, p], [fields, by_hand], use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert fields.logits_processors is None
    plain = llm.generate(p, SamplingParams(**base), use_tqdm=False)[0].outputs[0].token_ids
    assert plain != a.outputs[0].token_ids  # the fields do something
    out = llm.generate(p, SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True,
                                         allowed_token_ids=[3, 9]), use_tqdm=False)[0].outputs[0].token_ids
    assert set(out) <= {3, 9} and len(set(out)) == 2
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={11: 100}),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert out == [11] * 5


@pytest.mark.parametrize("kw,msg", [({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0},
                                    "repetition_penalty"), ({"min_p": 1.5}, "min_p"), ({"allowed_token_ids": []},
                                    "allowed_token_ids"), ({"logit_bias": {-1: 1.0}}, "logit_bias")])
def test_bad_sampling_fields_are_refused(kw, msg):
    from glm5.engine import SamplingParams

    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_token_ids_beyond_the_vocabulary_are_refused_when_added(nano):
    from glm5.engine import LLM, SamplingParams

    llm = LLM(nano, block_size=4)
    for kw in ({"logit_bias": {10**6: 1.0}}, {"allowed_token_ids": [1, 10**6]}):
        with pytest.raises(ValueError, match="vocabulary size"):
            llm.generate([[1, 2, 3]], SamplingParams(**kw), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
