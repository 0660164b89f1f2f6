"""LLM.beam_search (vLLM's API): width 1 is greedy decoding, and the engine-backed search equals a plain beam search
written against the no-cache model, EOS handling and the length penalty included."""

import pytest
import torch

from glm5.engine import LLM, BeamSearchParams

from .conftest import count_forward_rows, make_model, prompts, ref_greedy


@torch.no_grad()
def ref_beam_search(model, prompt, bw, steps, eos=(), ignore_eos=False, length_penalty=1.0):
    """The textbook algorithm on full no-cache forwards: (tokens, cum_logprob) of the best beams, best first."""
    live, done = [(list(prompt), 0.0)], []
    for _ in range(steps):
        cands = []
        for toks, cum in live:
            logp = torch.log_softmax(model(torch.tensor([toks])).logits[0, -1].float(), -1)
            top = logp.topk(2 * bw)
            cands += [(toks + [int(i)], cum + float(v)) for v, i in zip(top.values, top.indices)]
        cands.sort(key=lambda c: -c[1])
        live = []
        for toks, cum in cands:
            if len(live) == bw:
                break
            (done if not ignore_eos and toks[-1] in eos else live).append((toks, cum))
    ranked = sorted(done + live, key=lambda b: -b[1] / max(1, len(b[0]) - len(prompt)) ** length_penalty)
    return ranked[:bw]


def test_width_one_is_greedy(nano):
    llm = LLM(nano, block_size=4)
    p = prompts([7], seed=1)[0]
    out = llm.beam_search([p], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))[0]
    assert out.sequences[0].tokens == p + ref_greedy(nano, p, 6)


@pytest.mark.parametrize("bw,ignore_eos,lp", [(3, True, 1.0), (2, False, 0.0)])
def test_equals_a_plain_beam_search_on_the_model(bw, ignore_eos, lp):
    model = make_model()
    p = prompts([9], seed=2)[0]
    if not ignore_eos:  # make a token the search meets at step 1 an EOS, so some beams finish early
        first = ref_beam_search(model, p, bw, 1)[1][0][-1]
        model = make_model(eos_token_id=[first])
    llm = LLM(model, block_size=4)
    got = llm.beam_search([p, {"prompt_token_ids": p[:5]}],
                          BeamSearchParams(beam_width=bw, max_tokens=4, ignore_eos=ignore_eos, length_penalty=lp))
    for prompt, out in zip([p, p[:5]], got):
        want = ref_beam_search(model, prompt, bw, 4, model.config.eos_token_ids, ignore_eos, lp)
        assert [s.tokens for s in out.sequences] == [t for t, _ in want]
        for s, (_, cum) in zip(out.sequences, want):
            assert s.cum_logprob == pytest.approx(cum, abs=1e-4) and sum(s.logprobs) == pytest.approx(s.cum_logprob)
    if not ignore_eos:
        assert any(s.finished for o in got for s in o.sequences)  # an EOS beam made it into the results


@pytest.mark.parametrize("spec", [0, 2])
def test_each_step_computes_only_the_beams_tails(nano, spec):
    """Every step submits each beam as a one-token request. The prefix cache must serve what earlier steps computed:
    those requests end in their first step, and before the twenty-second session such a request registered no
    block, so every step recomputed every beam in full (0 prefix hits)."""
    llm = LLM(nano, block_size=4, num_speculative_tokens=spec)
    rows = count_forward_rows(llm)
    p = prompts([30], seed=3)[0]
    bw, steps = 3, 6
    out = llm.beam_search([p], BeamSearchParams(beam_width=bw, max_tokens=steps, ignore_eos=True))[0]
    assert [s.tokens for s in out.sequences] == [t for t, _ in ref_beam_search(nano, p, bw, steps)]
    assert rows[0] == 30  # step 1: one beam, the prompt
    # later steps: each beam's uncached tail, at most a block and its MTP lookahead (and one token more)
    assert all(n <= bw * (4 + spec + 1) for n in rows[1:]), rows
    assert llm.engine.block_manager.prefix_hits >= (steps - 1) * bw * 24


def test_bad_params_are_refused():
    for kw in ({"beam_width": 0, "max_tokens": 2}, {"beam_width": 2, "max_tokens": 0}):
        with pytest.raises(ValueError):
            BeamSearchParams(**kw)


def test_text_prompts_and_texts(nano, small_tokenizer):
    llm = LLM(nano, tokenizer=small_tokenizer, block_size=4)
    out = llm.beam_search("The king", BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True))[0]
    n = len(small_tokenizer.encode("The king"))
    assert len(out.sequences) == 2 and out.sequences[0].cum_logprob >= out.sequences[1].cum_logprob
    for s in out.sequences:
        assert s.text == small_tokenizer.decode(s.tokens[n:], skip_special_tokens=True) and len(s.tokens) == n + 5
