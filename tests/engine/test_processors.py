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
    # seed 6: seeded tokens are races on position-keyed noise, and seed 5's 12 tokens happen to survive the fields
    base = dict(temperature=0.8, seed=6, max_tokens=12, ignore_eos=True)
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


def test_bad_words_processor_bans_the_token_that_would_complete_a_word():
    from glm5.engine.processors import bad_words_processor

    p = bad_words_processor([[5], [7, 8, 9]])
    logits = torch.zeros(12)
    banned = lambda out: {i for i in range(12) if math.isinf(p(out, logits)[i].item())}  # noqa: E731
    assert banned([]) == {5}  # a one-token word: always
    assert banned([1, 7, 8]) == {5, 9}  # 9 would complete 7 8 9
    assert banned([7, 1, 8]) == banned([8]) == banned([7]) == {5}  # only a full prefix counts
    assert bad_words_processor([[7, 8]])([1], logits) is logits  # nothing to ban: the logits pass untouched
    assert logits.eq(0).all()  # and banning never writes into the caller's tensor


def test_bad_words_and_prompt_truncation_in_the_engine(nano, small_tokenizer):
    """bad_words (tokenized with and without a leading space) keep a word out of the output; the rest of the output
    is what banning its tokens by hand gives. truncate_prompt_tokens keeps the prompt's last k tokens."""
    from glm5.engine import LLM, SamplingParams
    from glm5.engine.processors import bad_word_sequences

    from .conftest import prompts, ref_greedy

    tok = small_tokenizer
    seqs = bad_word_sequences(tok, ["the"])
    assert tok.encode("the") in seqs and tok.encode(" the") in seqs
    llm = LLM(nano, tokenizer=tok, block_size=4)
    p = prompts([8], seed=4)[0]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    plain = llm.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids
    word = tok.decode([plain[0]])
    assert tok.encode(word.lstrip()) == [plain[0]] or tok.encode(" " + word.lstrip()) == [plain[0]]
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, bad_words=[word]),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert plain[0] not in out
    by_hand = [s[0] for s in bad_word_sequences(tok, [word]) if len(s) == 1]
    assert out == llm.generate(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                 logits_processors=[ban_tokens(by_hand)]),
                               use_tqdm=False)[0].outputs[0].token_ids

    long = prompts([20], seed=6)[0]
    res = llm.generate(long, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, truncate_prompt_tokens=5),
                       use_tqdm=False)[0]
    assert res.prompt_token_ids == long[-5:]
    assert res.outputs[0].token_ids == ref_greedy(nano, long[-5:], 6)
    small = LLM(nano, block_size=4, max_model_len=16)
    res = small.generate(long, SamplingParams(temperature=0, max_tokens=1, truncate_prompt_tokens=-1),
                         use_tqdm=False)[0]
    assert res.prompt_token_ids == long[-15:]  # -1: the longest prompt that leaves room for one token
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words="the")
    with pytest.raises(ValueError, match="bad_words need a tokenizer"):
        LLM(nano).generate(p, SamplingParams(bad_words=["x"]), use_tqdm=False)
