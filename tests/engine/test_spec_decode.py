"""MTP speculative decoding: drafts follow the model's MTP recursion, greedy output is unchanged, rejection
sampling keeps the target distribution."""

import pytest
import torch

from glm5.engine import LLM, SamplingParams
from glm5.engine.config import EngineConfig
from glm5.engine.spec_decode import rejection_sample, top2_gap

from .conftest import PrefixCacheAudit, make_model, prompts, ref_chain_drafts, ref_greedy, ref_mtp_drafts

DRAFTS = {"recursive": ref_mtp_drafts, "chain": ref_chain_drafts}  # the drafts each mtp_draft_mode must propose


def test_spec_greedy_equals_plain_greedy(nano):
    ps = prompts([5, 21, 40], seed=20)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(nano, block_size=4).generate(ps, sp)
    llm = LLM(nano, block_size=4, num_speculative_tokens=3, max_num_batched_tokens=16)
    spec = llm.generate(ps, sp)
    for a, b, p in zip(plain, spec, ps):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == ref_greedy(nano, p, 12)
    m = llm.spec_metrics()
    assert m["verify_steps"] > 0 and m["draft_tokens"] > 0 and 1.0 <= m["acceptance_length"] <= 4.0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks - 1


@pytest.mark.parametrize("mode", ["recursive", "chain"])
def test_drafts_follow_mtp_recursion_and_accepted_drafts_commit(nano, mode):
    """Every step's drafts equal the model's own MTP recursion (or chain) over the full sequence; then the drafts are
    replaced by an oracle (two right, one wrong) so that verification accepts tokens and the MTP caches must catch
    up (the chain's tentative entries past the sequence are rewritten)."""
    ps = prompts([6, 19, 27], seed=21)
    n = 14
    refs = [p + ref_greedy(nano, p, n) for p in ps]
    llm = LLM(nano, block_size=4, num_speculative_tokens=3, max_num_batched_tokens=32, mtp_draft_mode=mode)
    assert len(llm.engine.kv_cache.latent) == nano.config.num_hidden_layers + (3 if mode == "recursive" else 1)
    audit = PrefixCacheAudit(llm.engine, nano).after_every_step()  # committed entries, past tentative ones too
    proposer = llm.engine.proposer
    orig = proposer.propose
    checked = []

    def propose(hidden, items, kmax, defer=False):
        ran = orig(hidden, items, kmax, defer)
        for (seq, _, _), k in zip(items, kmax):
            if not k:
                continue
            checked.append(seq.draft_token_ids == DRAFTS[mode](nano, seq.token_ids, k))
            ref = next(r for r in refs if r[: seq.num_prompt_tokens] == seq.prompt_token_ids)
            oracle = ref[seq.num_tokens:seq.num_tokens + k]
            if k == 3:
                oracle[2] = (oracle[2] + 1) % nano.config.vocab_size
            seq.draft_token_ids = oracle
        return ran

    proposer.propose = propose
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for o, r, p in zip(outs, refs, ps):
        assert o.outputs[0].token_ids == r[len(p):]
    assert len(checked) > 6 and all(checked) and audit.checked > 20
    m = llm.spec_metrics()
    assert m["acceptance_length"] > 2.5  # two of three oracle drafts are right
    assert all(o.metrics["spec_acceptance_length"] > 2.5 for o in outs)


@pytest.mark.parametrize("mode", ["recursive", "chain"])
def test_draft_stop_gap_ends_greedy_drafts_after_a_close_call(nano, mode):
    """spec_draft_stop_gap: each step's drafts are the reference drafts cut after the first draft whose two best MTP
    logits are closer than the gap (0.03 is about the median gap of this random model, so steps draft 1, 2 or 3);
    the output is still exactly the plain greedy one."""
    gap, k, n = 0.03, 3, 14
    ps = prompts([6, 19, 27], seed=25)
    llm = LLM(nano, block_size=4, num_speculative_tokens=k, max_num_batched_tokens=32, mtp_draft_mode=mode,
              spec_draft_stop_gap=gap)
    proposer, orig, counts = llm.engine.proposer, llm.engine.proposer.propose, []

    def propose(hidden, items, kmax, defer=False):
        ran = orig(hidden, items, kmax, defer)
        for (seq, _, _), km in zip(items, kmax):
            if km:
                assert seq.draft_token_ids == DRAFTS[mode](nano, seq.token_ids, km, stop_gap=gap)
                counts.append(len(seq.draft_token_ids))
        return ran

    proposer.propose = propose
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for o, p in zip(outs, ps):
        assert o.outputs[0].token_ids == ref_greedy(nano, p, n)
    assert 1 in counts and max(counts) > 1  # the gap both stops drafts early and lets confident ones run on
    assert llm.spec_metrics()["draft_tokens"] == sum(counts)


def test_verification_and_drafting_through_the_cuda_graph_path(nano):
    """With CUDA graphs (their static layout run eagerly on CPU), verification steps go through the model graphs for
    k + 1 rows per sequence, and depth-1 MTP steps through the MTP graphs (catch-ups of up to k + 1 rows, longer ones
    eagerly; greedy chained drafts all in one static step, as CPU compile_decode runs them, sampled ones one row at
    a time). Drafts, cut short by the stop gap, equal the no-cache chain reference (then oracle drafts are verified
    instead, so that they are accepted); greedy output is still the plain output; a seeded sampled request gets the
    tokens it gets without graphs."""
    from glm5.engine.static_decode import StaticDecodeRunner

    ps = prompts([6, 19, 27], seed=28)
    gap, n = 0.05, 12
    kw = dict(block_size=4, max_model_len=64, num_speculative_tokens=3, spec_draft_stop_gap=gap)
    llm = LLM(nano, **kw)
    graphs = StaticDecodeRunner(llm.engine.runner, max_num_seqs=16, max_model_len=64, capture=False)
    llm.engine.runner.graphs = graphs
    used, chained, run_rows, run_chain, propose = [], [], graphs.run_rows, graphs.run_chain, llm.engine.proposer.propose

    def counted(chunks, R, hidden=None):
        out = run_rows(chunks, R, hidden)
        used.append(("model" if hidden is None else "mtp", R, max(c.n for c in chunks), out is not None))
        return out

    def counted_chain(chunks, hidden, steps, S):
        out = run_chain(chunks, hidden, steps, S)
        chained.append((S, out is not None))
        return out

    refs = [p + ref_greedy(nano, p, n) for p in ps]

    def checked(hidden, items, kmax, defer=False):
        ran = propose(hidden, items, kmax, defer)
        for (seq, _, _), k in zip(items, kmax):
            if k:
                drafts = seq.draft_token_ids
                assert drafts == ref_chain_drafts(nano, seq.token_ids, k, stop_gap=gap)
                # then the right tokens, so that drafts are accepted and depth 1 catches up over several rows
                ref = next(r for r in refs if r[: seq.num_prompt_tokens] == seq.prompt_token_ids)
                seq.draft_token_ids = ref[seq.num_tokens:seq.num_tokens + len(drafts)]
        return ran

    graphs.run_rows, graphs.run_chain, llm.engine.proposer.propose = counted, counted_chain, checked
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for o, r, p in zip(outs, refs, ps):
        assert o.outputs[0].token_ids == r[len(p):]
    assert all(ok for _, R, rows, ok in used if rows <= R)  # only a long catch-up (a prompt's) runs eagerly
    replayed = {(kind, R, rows > 1) for kind, R, rows, ok in used if ok}
    assert {("model", 4, True), ("mtp", 4, True)} <= replayed, replayed
    assert chained and set(chained) == {(2, True)} and ("mtp", 1, False) not in replayed  # drafts 2..3 in one step
    llm.engine.proposer.propose = propose  # its own drafts from here on (sampled: no greedy reference)
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=n, ignore_eos=True)
    eager = LLM(nano, **kw).generate(ps[:1], sp)[0].outputs[0].token_ids
    assert llm.generate(ps[:1], sp)[0].outputs[0].token_ids == eager
    assert ("mtp", 1, False) in {(kind, R, rows > 1) for kind, R, rows, ok in used if ok}  # sampled: one by one


def test_draft_stop_gap_leaves_sampled_requests_drafting_k(nano):
    """Sampled requests ignore the gap: same tokens and the same draft counts as without it."""
    p = prompts([13], seed=26)[0]
    sp = SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True)
    runs = [LLM(nano, num_speculative_tokens=3, spec_draft_stop_gap=g) for g in (0.0, 1e9)]
    outs = [r.generate([p], sp)[0].outputs[0].token_ids for r in runs]
    assert outs[0] == outs[1] and len(outs[0]) == 12
    assert runs[0].spec_metrics() == runs[1].spec_metrics()
    greedy = LLM(nano, num_speculative_tokens=3, spec_draft_stop_gap=1e9)  # every greedy draft is a close call
    greedy.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    m = greedy.spec_metrics()
    assert m["draft_tokens"] == m["verify_steps"]


def test_top2_gap_and_stop_gap_validation():
    g = top2_gap(torch.tensor([[3.0, 1.0, 2.5], [0.0, float("-inf"), float("-inf")], [1.0, 1.0, 0.0]]))
    assert g.tolist() == [0.5, float("inf"), 0.0]
    assert top2_gap(torch.tensor([[4.0]])).tolist() == [float("inf")]  # a one-token vocabulary
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="spec_draft_stop_gap"):
            EngineConfig(spec_draft_stop_gap=bad)


@pytest.mark.parametrize("mode", ["recursive", "chain"])
def test_prompts_shorter_than_the_draft_depth(nano, mode):
    """A 1- or 2-token prompt with 5 drafts: the deepest MTP depths have no committed position yet at the first
    steps (their token lies beyond the sequence). Used to drive a depth's committed length negative and crash
    the next step (found with ``glm5 generate --prompt hi --spec-tokens 3``)."""
    ps = prompts([1, 2, 3], seed=27)
    n = 10
    llm = LLM(nano, block_size=4, num_speculative_tokens=5, mtp_draft_mode=mode)
    proposer = llm.engine.proposer
    orig, checked = proposer.propose, []

    def propose(hidden, items, kmax, defer=False):
        ran = orig(hidden, items, kmax, defer)
        for (seq, _, _), k in zip(items, kmax):
            if k:
                checked.append(seq.draft_token_ids == DRAFTS[mode](nano, seq.token_ids, k))
            assert all(m >= 0 for m in seq.spec.mtp_len)
        return ran

    proposer.propose = propose
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for o, p in zip(outs, ps):
        assert o.outputs[0].token_ids == ref_greedy(nano, p, n)
    assert len(checked) >= 3 and all(checked)


@pytest.mark.parametrize("mode", ["recursive", "chain"])
def test_drafting_pauses_for_large_batches_and_resumes_with_caught_up_mtp_caches(nano, monkeypatch, mode):
    """spec_disable_batch_size: while more sequences run than the limit, no drafts (the MTP caches only hold back
    their rows); as requests finish and the batch shrinks, drafting resumes, and every draft must again equal the
    model's own MTP recursion over the whole sequence: the deferred catch-up filled the MTP caches exactly."""
    import glm5.engine.spec_decode as spec_decode

    ps = prompts([6, 19, 27, 9], seed=23)
    lens = [4, 6, 30, 25]  # two requests end early: the batch shrinks from 4 to 2
    llm = LLM(nano, block_size=4, num_speculative_tokens=3, spec_disable_batch_size=2, max_num_batched_tokens=64,
              mtp_draft_mode=mode)
    audit = PrefixCacheAudit(llm.engine, nano).after_every_step()
    proposer = llm.engine.proposer
    orig = proposer.propose
    log = []

    def propose(hidden, items, kmax, defer=False):
        ran = orig(hidden, items, kmax, defer)
        log.append((defer, max(kmax)))
        for (seq, _, _), k in zip(items, kmax):
            if k and seq.draft_token_ids:
                assert seq.draft_token_ids == DRAFTS[mode](nano, seq.token_ids, len(seq.draft_token_ids))
                log.append("checked")
        return ran

    proposer.propose = propose
    monkeypatch.setattr(spec_decode, "MAX_DEFERRED_ROWS", 8)  # one sequence also hits the backlog bound
    outs = llm.generate(ps, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens])
    for o, p, n in zip(outs, ps, lens):
        assert o.outputs[0].token_ids == ref_greedy(nano, p, n)
    deferred = [e for e in log if isinstance(e, tuple) and e[0]]
    assert deferred and all(k == 0 for _, k in deferred)  # paused steps draft nothing
    first_resumed = next(i for i, e in enumerate(log) if e == "checked")
    assert any(isinstance(e, tuple) and e[0] for e in log[:first_resumed])  # drafting came back after a pause
    assert log.count("checked") > 5
    m = llm.spec_metrics()
    assert m["paused_steps"] == len(deferred) and m["verify_steps"] > 0
    assert audit.checked > 20


def test_spec_decode_with_preemption_and_prefix_cache(nano):
    ps = prompts([26, 22, 18], seed=22)
    shared = ps[0][:16]
    ps.append(shared + [3, 4, 5, 6, 7])
    llm = LLM(nano, block_size=4, num_blocks=18, max_model_len=48, max_num_seqs=4, num_speculative_tokens=2)
    audit = PrefixCacheAudit(llm.engine, nano).after_every_step()
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for o, p in zip(outs, ps):
        assert o.outputs[0].token_ids == ref_greedy(nano, p, 10)
    assert llm.engine.scheduler.num_preemptions > 0 and audit.checked > 20
    assert llm.engine.block_manager.num_free_blocks == 17


def test_spec_sampling_is_seeded_and_batch_independent(nano):
    p = prompts([11], seed=23)[0]
    sp = SamplingParams(temperature=0.8, seed=5, max_tokens=10, ignore_eos=True)
    a = LLM(nano, num_speculative_tokens=3).generate([p], sp)[0].outputs[0].token_ids
    others = prompts([7, 30], seed=24)
    b = LLM(nano, num_speculative_tokens=3).generate(
        [others[0], p, others[1]], [SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True), sp,
                                    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)])
    assert b[1].outputs[0].token_ids == a and len(a) == 10


def test_rejection_sampling_preserves_the_target_distribution():
    """Draft from q, verify against p: the first emitted token is distributed as p[0] (and, after an accepted
    draft, the second as p[1]) whatever q is. 20k trials on a 6-token vocabulary, fixed seed; tolerances are about
    4-5 standard errors."""
    g = torch.Generator().manual_seed(0)
    V, trials = 6, 20000
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                      [0.05, 0.05, 0.50, 0.20, 0.10, 0.10],
                      [0.20, 0.20, 0.20, 0.20, 0.10, 0.10]])
    q = torch.tensor([[0.10, 0.10, 0.40, 0.30, 0.05, 0.05],
                      [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
    drafts = torch.stack([torch.multinomial(q[i], trials, replacement=True, generator=g) for i in range(2)], 1).tolist()
    first, second = torch.zeros(V), torch.zeros(V)
    n_acc = 0
    for d in drafts:
        out, a = rejection_sample(p, d, q, g)
        first[out[0]] += 1
        if a >= 1:  # first draft accepted: the next token is distributed as p[1]
            n_acc += 1
            second[out[1]] += 1
    torch.testing.assert_close(first / trials, p[0], atol=0.016, rtol=0)
    torch.testing.assert_close(second / n_acc, p[1], atol=0.025, rtol=0)
    assert abs(n_acc / trials - torch.minimum(p[0], q[0]).sum().item()) < 0.016  # P(accept) = Σ min(p, q)
    # greedy: exact match against the target argmax, bonus from the next row
    greedy_p = torch.nn.functional.one_hot(torch.tensor([2, 3, 1]), V).float()
    assert rejection_sample(greedy_p, [2, 3], None, None) == ([2, 3, 1], 2)
    assert rejection_sample(greedy_p, [2, 5], None, None) == ([2, 3], 1)
    assert rejection_sample(greedy_p, [4, 3], None, None) == ([2], 0)


def test_model_without_mtp_rejects_speculation():
    import pytest

    m = make_model(num_nextn_predict_layers=0)
    with pytest.raises(ValueError):
        LLM(m, num_speculative_tokens=2)
    assert LLM(m).generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids


def test_spec_respects_stop_ids_and_min_tokens(nano):
    p = prompts([15], seed=25)[0]
    ref = ref_greedy(nano, p, 12)
    stop = ref[3]
    for sp in (SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]),
               SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop], min_tokens=6)):
        plain = LLM(nano).generate([p], sp)[0].outputs[0]
        spec = LLM(nano, num_speculative_tokens=3).generate([p], sp)[0].outputs[0]
        assert plain.token_ids == spec.token_ids and plain.finish_reason == spec.finish_reason
    assert LLM(nano).generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))[0] \
        .outputs[0].token_ids == ref[: ref.index(stop) + 1]


def test_seeded_spec_sampling_ignores_chunking_budget_and_preemption(nano):
    """A seeded request's tokens must not depend on where prefill chunks end, on batch mates taking the step budget,
    or on preemption. Found by tests/engine/test_engine_fuzz.py when its random numbers were a stream drawn in a
    fixed order: a chunk ending one token short of the prompt used to let the proposer draft before the first token
    was sampled, turning that sample into a verification. Position-keyed noise (tests/engine/test_seeded_noise.py)
    makes the order irrelevant; the schedule still drafts only after a sampled token."""
    p = prompts([17], seed=31)[0]
    sp = SamplingParams(temperature=0.9, seed=11, n=2, max_tokens=12, ignore_eos=True)

    def run(prompt_list, params, **kw):
        llm = LLM(nano, block_size=4, num_speculative_tokens=2, max_model_len=48, **kw)
        outs = llm.generate(prompt_list, params)
        return outs, llm

    (alone,), _ = run([p], sp, max_num_batched_tokens=256)
    want = [c.token_ids for c in alone.outputs]
    (short,), _ = run([p], sp, max_num_batched_tokens=8, max_num_seqs=1)  # chunks 8 + 8 stop one token short
    assert [c.token_ids for c in short.outputs] == want
    mates = prompts([30, 25], seed=32)
    outs, _ = run(mates + [p], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 2 + [sp],
                  max_num_batched_tokens=8)
    assert [c.token_ids for c in outs[2].outputs] == want
    outs, llm = run(mates + [p], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 2 + [sp],
                    num_blocks=20, enable_prefix_caching=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in outs[2].outputs] == want


@torch.no_grad()
def test_processed_logprobs_with_and_without_speculation_are_the_tempered_model_distribution(nano):
    """RL's rollout log-probs at temperature != 1: plain and speculative (verified) tokens both report
    log_softmax(logits / T) of the full no-cache model."""
    p = prompts([7])[0]
    sp = SamplingParams(temperature=0.7, seed=11, max_tokens=10, ignore_eos=True, logprobs=0)
    for k in (0, 2):
        out = LLM(nano, block_size=4, num_speculative_tokens=k, logprobs_mode="processed_logprobs").generate(
            [p], sp, use_tqdm=False)[0].outputs[0]
        full = nano(torch.tensor([p + out.token_ids])).logits[0, len(p) - 1:-1]
        ref = (full / 0.7).log_softmax(-1)
        for j, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
            assert d[tok] == pytest.approx(float(ref[j, tok]), abs=2e-4), (k, j)
