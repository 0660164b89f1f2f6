"""Continuous batching, per-request sampling parameters and seeds, finish reasons, logprobs, abort."""

import pytest
import torch

from glm5.engine import LLM, SamplingParams
from glm5.engine.llm_engine import LLMEngine, EngineConfig

from .conftest import PrefixCacheAudit, prompts, ref_greedy


def _run_all(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return done


def test_requests_join_and_leave_at_step_boundaries(nano):
    eng = LLMEngine(nano, config=EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=16))
    ps = prompts([9, 30, 4, 17, 22], seed=11)
    lens = [3, 12, 7, 5, 9]
    eng.add_request(ps[0], SamplingParams(temperature=0, max_tokens=lens[0], ignore_eos=True), request_id="a")
    eng.add_request(ps[1], SamplingParams(temperature=0, max_tokens=lens[1], ignore_eos=True), request_id="b")
    done, batch_sizes = {}, []
    late = {4: ("c", 2), 6: ("d", 3), 9: ("e", 4)}  # step -> request arriving before it
    step = 0
    while eng.has_unfinished_requests() or late:
        if step in late:
            rid, i = late.pop(step)
            eng.add_request(ps[i], SamplingParams(temperature=0, max_tokens=lens[i], ignore_eos=True), request_id=rid)
        batch_sizes.append(len(eng.scheduler.running) + min(len(eng.scheduler.waiting), 4))
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        step += 1
    assert len(set(batch_sizes)) > 2  # the batch grew and shrank
    for rid, i in zip("abcde", range(5)):
        assert done[rid].outputs[0].token_ids == ref_greedy(nano, ps[i], lens[i]), rid
        assert len(done[rid].outputs[0].token_ids) == lens[i]


def test_per_request_params_and_seed_independent_of_batch_mates(nano):
    p = prompts([12], seed=4)[0]
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = LLM(nano, block_size=4).generate([p], sp)[0].outputs[0].token_ids
    others = prompts([5, 33, 20], seed=5)
    mates = [SamplingParams(temperature=1.3, seed=7, max_tokens=9, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
             SamplingParams(temperature=0.7, top_k=3, max_tokens=5, ignore_eos=True)]  # no seed: engine RNG
    outs = LLM(nano, block_size=4, max_num_batched_tokens=24).generate(others[:2] + [p] + others[2:],
                                                                         mates[:2] + [sp] + mates[2:])
    assert outs[2].outputs[0].token_ids == alone
    assert outs[1].outputs[0].token_ids == ref_greedy(nano, others[1], 14)
    other_seed = LLM(nano, block_size=4).generate([p], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99,
                                                                      max_tokens=12, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_top_k_one_is_greedy_and_n_completions(nano):
    p = prompts([10], seed=6)[0]
    out = LLM(nano).generate([p], SamplingParams(temperature=1.0, top_k=1, n=3, seed=0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert c.token_ids == ref_greedy(nano, p, 6)
    out = LLM(nano).generate([p], SamplingParams(temperature=1.5, n=2, seed=0, max_tokens=8, ignore_eos=True))[0]
    assert out.outputs[0].token_ids != out.outputs[1].token_ids  # seed + i per completion


def test_finish_reasons_stop_ids_eos_and_length(nano):
    p = prompts([14], seed=8)[0]
    ref = ref_greedy(nano, p, 12)
    llm = LLM(nano)
    stop_at = ref[5]
    first = ref.index(stop_at)
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop_at
    assert o.token_ids == ref[: first + 1]  # the stop id is the last token
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert o.finish_reason == "length" and o.stop_reason is None and len(o.token_ids) == 4
    # the model's EOS ids stop generation unless ignore_eos; min_tokens defers them
    eng = LLMEngine(nano, config=EngineConfig())
    eng.eos_ids = {ref[2]}
    eng.add_request(p, SamplingParams(temperature=0, max_tokens=12), request_id="x")
    o = _run_all(eng)["x"].outputs[0]
    assert o.token_ids == ref[: ref.index(ref[2]) + 1] and o.finish_reason == "stop"
    eng.add_request(p, SamplingParams(temperature=0, max_tokens=12, min_tokens=8), request_id="y")
    o = _run_all(eng)["y"].outputs[0]
    assert len(o.token_ids) >= 8 and ref[2] not in o.token_ids[:8]  # masked, not merely ignored
    # max_model_len ends a request with "length"
    o = LLM(nano, max_model_len=20).generate([p], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert o[0].outputs[0].finish_reason == "length" and len(o[0].outputs[0].token_ids) == 6


def test_logprobs_are_raw_model_logprobs(nano):
    p = prompts([9], seed=10)[0]
    o = LLM(nano).generate([p], SamplingParams(temperature=0.8, seed=3, max_tokens=5, logprobs=3, ignore_eos=True))
    c = o[0].outputs[0]
    assert len(c.logprobs) == 5
    toks = list(p)
    total = 0.0
    for t, lp in zip(c.token_ids, c.logprobs):
        with torch.no_grad():
            ref = torch.log_softmax(nano(torch.tensor([toks])).logits[0, -1].float(), -1)
        assert t in lp and 3 <= len(lp) <= 4
        assert abs(lp[t] - float(ref[t])) < 1e-4
        top = ref.topk(3).indices.tolist()
        assert all(i in lp for i in top)
        total += lp[t]
        toks.append(t)
    assert abs(c.cumulative_logprob - total) < 1e-4


def test_abort_frees_blocks(nano):
    eng = LLMEngine(nano, config=EngineConfig(block_size=4, max_num_seqs=4))
    ps = prompts([20, 30, 11], seed=12)
    for i, p in enumerate(ps):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), request_id=f"r{i}")
    for _ in range(4):
        eng.step()
    bm = eng.block_manager
    held = len(next(s for s in eng.scheduler.running if s.request_id == "r1").block_table)
    free_before = bm.num_free_blocks
    out = eng.abort("r1")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert bm.num_free_blocks == free_before + held
    assert eng.abort("r1") is None  # already gone
    done = _run_all(eng)
    assert set(done) == {"r0", "r2"}
    assert bm.num_free_blocks == bm.num_blocks - 1


def test_invalid_requests_are_rejected(nano):
    llm = LLM(nano, max_model_len=32)
    with pytest.raises(ValueError):
        llm.generate([list(range(1, 40))], SamplingParams(max_tokens=2))  # prompt longer than max_model_len
    with pytest.raises(ValueError):
        llm.generate("text without a tokenizer")
    with pytest.raises(ValueError):
        llm.generate([[1, 2, 5000]])  # outside the vocabulary
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    assert not llm.engine.has_unfinished_requests()


class _Ban:
    """Logits processor that forbids a fixed set of tokens and records the output ids it was shown."""

    def __init__(self, banned):
        self.banned = list(banned)
        self.seen: list[list[int]] = []

    def __call__(self, out_ids, logits):
        self.seen.append(list(out_ids))
        logits = logits.clone()
        logits[self.banned] = float("-inf")
        return logits


@pytest.mark.parametrize("spec", [0, 3])
def test_logits_processors_steer_sampling_but_not_logprobs(nano, spec):
    p = prompts([9], seed=21)[0]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    plain = LLM(nano).generate([p], sp)[0].outputs[0]
    ban = _Ban(set(plain.token_ids))  # every token the unconstrained greedy run chose
    llm = LLM(nano, num_speculative_tokens=spec)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0,
                                           logits_processors=[ban]))[0].outputs[0]
    assert not set(out.token_ids) & set(plain.token_ids)
    # the processor saw the growing output, one position per step; with speculation also the prefixes extended by
    # the drafts being verified, each a real prefix plus drafts (drafts are proposed for processed sequences too)
    real = [out.token_ids[:i] for i in range(6)]
    if spec:
        assert all(r in ban.seen for r in real) and len(ban.seen) >= len(real)
        assert all(any(q[:len(r)] == r and len(q) - len(r) <= spec for r in real) for q in ban.seen)
    else:
        assert ban.seen == real
    # greedy over the processed logits == the reference model's argmax with the banned ids removed,
    # while the reported logprobs are the raw model's
    toks = list(p)
    for t, lp in zip(out.token_ids, out.logprobs):
        with torch.no_grad():
            logits = nano(torch.tensor([toks])).logits[0, -1].float()
        ref = torch.log_softmax(logits, -1)
        logits[ban.banned] = float("-inf")
        assert t == int(logits.argmax())
        assert abs(lp[t] - float(ref[t])) < 1e-4
        toks.append(t)


def test_logits_processors_see_each_completions_own_output(nano):
    p = prompts([7], seed=22)[0]
    seen = {}

    def record(out_ids, logits):
        seen.setdefault(len(out_ids), []).append(tuple(out_ids))
        return logits

    out = LLM(nano).generate([p], SamplingParams(temperature=1.5, n=3, seed=1, max_tokens=5, ignore_eos=True,
                                                 logits_processors=[record]))[0]
    comps = [tuple(c.token_ids) for c in out.outputs]
    for i in range(5):
        assert sorted(seen[i]) == sorted(c[:i] for c in comps)


def test_bad_logits_processors_are_rejected(nano):
    with pytest.raises(ValueError, match="callables"):
        SamplingParams(logits_processors=[3])


def _raises(ids, lg):
    if len(ids) == 2:
        raise KeyError("boom")
    return lg


@pytest.mark.parametrize("bad,why", [
    (lambda ids, lg: lg[:5], "expected a tensor of shape"),
    (_raises, "KeyError: 'boom'"),
    (lambda ids, lg: lg * float("nan"), "no usable logits"),
    (lambda ids, lg: torch.full_like(lg, float("-inf")), "exclude every token"),
])
def test_a_failing_request_ends_alone(nano, bad, why):
    """A request whose processor raises, returns the wrong shape or leaves nothing to sample finishes with
    finish_reason "error" and the reason; the requests batched with it are untouched."""
    ps = prompts([9, 12, 6], seed=23)
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, seed=5, max_tokens=6, ignore_eos=True)
    alone = LLM(nano).generate([ps[0], ps[2]], [good, sampled])
    outs = LLM(nano).generate(ps, [good, SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True,
                                                         logits_processors=[bad]), sampled])
    failed = outs[1].outputs[0]
    assert failed.finish_reason == "error" and why in failed.stop_reason
    assert outs[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert outs[0].outputs[0].finish_reason == outs[2].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("spec", [0, 3])
def test_non_finite_logits_fail_one_request_not_the_engine(nano, spec):
    """Model-side NaN in one row (as an fp16 overflow would give): that sequence ends with "error", the others
    in the batch finish exactly as without the fault, and the engine keeps serving."""
    ps = prompts([8, 11, 5], seed=24)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(nano).generate(ps, sp)]
    llm = LLM(nano, num_speculative_tokens=spec)
    runner = llm.engine.runner
    orig, state = runner.logits, {"armed": True}

    def poisoned(h):
        out = orig(h)
        if state["armed"] and out.shape[0] >= 3:  # once, on a step that has every sequence in it
            state["armed"] = False
            out = out.clone()
            out[0] = float("nan")
        return out

    runner.logits = poisoned
    outs = llm.generate(ps, sp)
    assert not state["armed"]
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert reasons.count("error") == 1, reasons
    for o, r in zip(outs, ref):
        if o.outputs[0].finish_reason == "error":
            assert "non-finite" in o.outputs[0].stop_reason
            assert o.outputs[0].token_ids == r[:len(o.outputs[0].token_ids)]
        else:
            assert o.outputs[0].token_ids == r
    runner.logits = orig
    assert [o.outputs[0].token_ids for o in llm.generate(ps, sp)] == ref  # still serving
    assert llm.engine.stats["failed_sequences"] == 1


def test_priority_policy_admits_lower_values_first_and_preempts_the_largest(nano):
    """scheduling_policy="priority": the waiting queue is ordered by (priority, arrival); the cache preempts the
    running sequence with the largest (priority, arrival). Outputs stay exactly the greedy ones."""
    eng = LLMEngine(nano, config=EngineConfig(block_size=4, max_num_seqs=1, max_num_batched_tokens=64,
                                              scheduling_policy="priority", enable_prefix_caching=False))
    ps = prompts([6, 7, 8, 9], seed=5)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for rid, p, pr in zip("abcd", ps, [5, 1, 5, -2]):
        eng.add_request(p, sp, request_id=rid, priority=pr)
    finished = []
    while eng.has_unfinished_requests():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == ["d", "b", "a", "c"]  # one at a time: by priority, ties by arrival

    # preemption: two running sequences outgrow a small cache. "low" (a large value) is admitted first; under fcfs
    # the later-admitted "high" would be preempted, under priority "low" yields every time
    for policy, victim in (("priority", "low"), ("fcfs", "high")):
        eng = LLMEngine(nano, config=EngineConfig(block_size=4, num_blocks=9, max_model_len=24, max_num_seqs=2,
                                                  scheduling_policy=policy, enable_prefix_caching=False))
        long = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        eng.add_request(ps[0], long, request_id="low", priority=9 if policy == "priority" else 0)
        seqs = {"low": eng.requests["low"].seqs[0]}
        done = {o.request_id: o for o in eng.step() if o.finished}
        eng.add_request(ps[1], long, request_id="high")
        seqs["high"] = eng.requests["high"].seqs[0]
        done.update(_run_all(eng))
        assert seqs[victim].num_preemptions > 0, policy
        assert sum(s.num_preemptions for s in seqs.values()) == seqs[victim].num_preemptions, policy
        for rid, p in (("low", ps[0]), ("high", ps[1])):
            assert done[rid].outputs[0].token_ids == ref_greedy(nano, p, 16), (policy, rid)


@pytest.mark.parametrize("kw", [{}, dict(num_speculative_tokens=2)], ids=["plain", "mtp"])
def test_a_higher_priority_sequence_never_yields_to_a_lower_one_scheduled_before_it(nano, kw):
    """Decoding sequences are scheduled first, so a low-priority one may already be in the step when a
    high-priority one needs a block. It is then taken out of the step and preempted (as vLLM does): before, the
    high-priority sequence preempted itself and finished last, in these four block alignments among others. The
    step's budget and prefix-cache registrations of the sequence taken out go back; tokens stay the greedy ones."""
    for high_len, low_len in ((3, 6), (7, 5), (10, 8), (12, 7)):
        eng = LLMEngine(nano, config=EngineConfig(block_size=4, num_blocks=9, max_model_len=24, max_num_seqs=2,
                                                  scheduling_policy="priority", **kw))
        audit = PrefixCacheAudit(eng, nano).after_every_step()
        low_p, high_p = prompts([low_len], seed=1)[0], prompts([high_len], seed=2)[0]
        low_sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        high_sp = SamplingParams(temperature=0, max_tokens=24 - high_len, ignore_eos=True)
        eng.add_request(low_p, low_sp, request_id="low", priority=9)
        eng.step()
        eng.add_request(high_p, high_sp, request_id="high", priority=0)
        high, low = eng.requests["high"].seqs[0], eng.requests["low"].seqs[0]
        done = {}
        while eng.has_unfinished_requests():
            done.update((o.request_id, o) for o in eng.step() if o.finished)
        assert list(done) == ["high", "low"], (high_len, low_len)
        assert high.num_preemptions == 0 and low.num_preemptions > 0
        assert done["high"].outputs[0].token_ids == ref_greedy(nano, high_p, high_sp.max_tokens)
        assert done["low"].outputs[0].token_ids == ref_greedy(nano, low_p, 16)
        assert audit.checked > 0


def test_fcfs_engine_refuses_a_priority(nano):
    eng = LLMEngine(nano)
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=2), priority=1)
    with pytest.raises(ValueError, match="scheduling_policy must be"):
        LLMEngine(nano, config=EngineConfig(scheduling_policy="lifo"))
    llm = LLM(nano, scheduling_policy="priority")
    with pytest.raises(ValueError, match="one value per prompt"):
        llm.generate([[1, 2], [3, 4]], SamplingParams(max_tokens=2), use_tqdm=False, priority=[0])
    outs = llm.generate([[1, 2], [3, 4]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False,
                        priority=[3, -1])
    assert [o.outputs[0].token_ids for o in outs] == [ref_greedy(nano, [1, 2], 3), ref_greedy(nano, [3, 4], 3)]
