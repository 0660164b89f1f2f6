"""SamplingParams.prompt_logprobs: the engine scores every prompt token as the model's full forward does, whatever
the chunking, batching, prefix cache, preemption or streaming."""

import pytest
import torch

import glm5.engine.llm_engine as llm_engine
from glm5.engine import LLM, SamplingParams

from .conftest import TOPK, prompts


@torch.no_grad()
def reference(model, prompt, dsa="sparse"):
    """log p(prompt[t] | prompt[:t]) for t >= 1 and the full log-distributions, from one no-cache forward."""
    lp = torch.log_softmax(model(torch.tensor([prompt]), dsa=dsa).logits[0].float(), dim=-1)  # [P, V]
    return lp


def check(out, model, prompt, k, atol=1e-4, dsa="sparse"):
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    ref = reference(model, prompt, dsa)
    for t in range(1, len(prompt)):
        d = plp[t]
        assert prompt[t] in d
        assert abs(d[prompt[t]] - float(ref[t - 1, prompt[t]])) < atol, f"position {t}"
        top = ref[t - 1].topk(k)
        for v, j in zip(top.values.tolist(), top.indices.tolist()):
            assert j in d and abs(d[j] - v) < atol
        assert len(d) <= k + 1
        # the engine ranks its own logits, which equal the reference's within atol: a token closer than that to the
        # prompt token may fall on either side of it (on some CPUs one does, 2,048 logits make near-ties common)
        x = ref[t - 1, prompt[t]]
        surely_above, maybe_above = int((ref[t - 1] > x + atol).sum()), int((ref[t - 1] > x - atol).sum()) - 1
        assert 1 + surely_above <= out.prompt_token_ranks[t] <= 1 + maybe_above, f"position {t}"
    assert out.prompt_token_ranks[0] is None and len(out.prompt_token_ranks) == len(prompt)


def test_prompt_logprobs_match_the_full_forward_chunked_and_batched(nano, monkeypatch):
    monkeypatch.setattr(llm_engine, "PROMPT_SCORE_ROWS", 5)  # several LM-head calls per chunk
    ps = prompts([2, TOPK - 1, 3 * TOPK + 5, 41], seed=7)
    llm = LLM(nano, block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),  # batched beside one without
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)]
    outs = llm.generate(ps, params)
    check(outs[0], nano, ps[0], 2)
    assert outs[1].prompt_logprobs is None
    check(outs[2], nano, ps[2], 0)
    check(outs[3], nano, ps[3], 3)
    assert llm.engine.stats["steps"] > 4  # the 41-token prompt was prefilled in chunks of at most 16


def test_a_scoring_request_does_not_skip_positions_through_the_prefix_cache(nano):
    p = prompts([30], seed=8)[0]
    llm = LLM(nano, block_size=4)
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    first = llm.generate([p], sp)[0]
    warm = llm.generate([p], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert warm.num_cached_tokens > 0  # the blocks are cached...
    again = llm.generate([p], sp)[0]
    assert again.num_cached_tokens == 0  # ...but a scoring request computes every position
    assert again.prompt_logprobs == first.prompt_logprobs
    check(again, nano, p, 1)


def test_n_completions_share_one_set_of_prompt_logprobs_and_preemption_repeats_none(nano):
    ps = prompts([26, 22, 18], seed=9)
    llm = LLM(nano, block_size=4, num_blocks=14, max_model_len=48, max_num_seqs=4, enable_prefix_caching=False)
    outs = llm.generate(ps, SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=10, ignore_eos=True,
                                           prompt_logprobs=1))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        assert len(o.outputs) == 2
        check(o, nano, p, 1)


def test_streamed_outputs_carry_prompt_logprobs_once(nano):
    p = prompts([20], seed=10)[0]
    llm = LLM(nano, block_size=4, max_num_batched_tokens=8)
    eng = llm.engine
    eng.add_request(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0))
    seen = []
    while eng.has_unfinished_requests():
        for o in eng.step(delta=True):
            seen.append(o.prompt_logprobs)
    got = [x for x in seen if x is not None]
    assert len(got) == 1 and seen[0] is not None  # with the first token, after the chunked prefill
    assert len(got[0]) == 20


def test_prompt_logprobs_validation():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
