"""Drafting paused above N sequences (``spec_disable_batch_size``): the rows the MTP caches hold back meanwhile
(``HeldRows``, one buffer for every sequence) come back exactly and stay bounded, and a long pause with sequences
finishing, joining and being preempted changes neither the drafts after it nor the tokens, and every block the
prefix cache holds meanwhile has final entries (a held row's MTP entry is not one yet)."""

from types import SimpleNamespace

import torch

import glm5.engine.spec_decode as spec_decode
from glm5.engine import LLM, SamplingParams
from glm5.engine.spec_decode import HeldRows, SpecState

from .conftest import PrefixCacheAudit, prompts, ref_chain_drafts, ref_greedy


def _seq(i: int):  # what HeldRows looks at in a Sequence
    return SimpleNamespace(seq_id=i, spec=SpecState(1), is_finished=False)


def test_held_rows_come_back_in_order_and_the_buffer_stays_within_twice_the_live_rows():
    """Rows put over many steps (one or several per sequence and step, from anywhere in each step's hidden states,
    in order or not) come back from ``take`` in order and exact, across compactions. Rows of sequences that caught up,
    finished, were preempted (spec None) or readmitted (a new SpecState) are dropped at the next compaction: the
    buffer never exceeds twice the most rows live sequences held at once; ``prune`` frees it once nothing is held."""
    H = 6
    g = torch.Generator().manual_seed(0)
    held, seqs = HeldRows(), [_seq(i) for i in range(12)]
    want = {s.seq_id: [] for s in seqs}
    peak = [0]  # the most rows live sequences held at once

    def step(live, t):
        n = [1 + (i + t) % 3 if t % 7 == 0 else 1 for i in range(len(live))]  # some multi-row steps
        hidden = torch.randn(sum(n) + 3, H, generator=g)
        holds, row = [], 3  # rows 0..2 belong to nobody: the offsets must be honoured
        for s, m in zip(live, n):
            holds.append((s, row, m))
            want[s.seq_id].append(hidden[row:row + m])
            row += m
        if t % 5 == 0:  # not in the hidden states' order: the gathered copy
            holds.reverse()
        held.put(hidden, holds)
        peak[0] = max(peak[0], sum(len(s.spec.held) for s in live))
        assert held.buf.shape[0] <= max(64, 2 * peak[0])  # sized to twice the live rows at each compaction

    for t in range(30):
        step(seqs, t)
    for s in seqs[:6]:  # caught up: the rows come back, the sequence holds nothing
        assert torch.equal(held.take(s), torch.cat(want[s.seq_id]))
        assert s.spec.held == [] and held.take(s) is None
    seqs[6].is_finished = True  # gone: their rows are garbage from now on
    seqs[7].spec = None
    seqs[8].spec = SpecState(1)
    want[8] = []
    survivors = seqs[8:]
    compact, compactions = held._compact, []
    held._compact = lambda *a: compactions.append(1) or compact(*a)
    for t in range(30, 150):
        step(survivors, t)
    assert compactions and set(held.holders) == {s.seq_id for s in survivors}  # the gone ones were dropped
    for s in survivors:
        assert torch.equal(held.take(s), torch.cat(want[s.seq_id]))
    held.prune()
    assert held.buf is None and held.holders == {}


def test_a_long_pause_with_finishes_admissions_and_preemption_changes_no_draft_and_no_token(nano, monkeypatch):
    """12 requests through 4 sequence slots and a cache small enough to preempt, drafting paused above 2 sequences:
    the pause comes and goes over ~70 steps, requests finish and join while others hold rows, three are preempted
    while holding rows, backlogs reach the (lowered) MAX_DEFERRED_ROWS bound. Every draft after a pause equals the
    chain reference over the whole sequence, greedy tokens equal the no-cache reference, seeded sampled tokens equal
    the engine's without drafts; after every step, every registered block's entries, MTP layer included, equal the
    no-cache forward's; the buffer stays within twice the rows 4 sequences can hold and is freed at the end."""
    monkeypatch.setattr(spec_decode, "MAX_DEFERRED_ROWS", 20)
    lens = [5, 9, 13, 7, 11, 6, 8, 12, 4, 10, 7, 9]
    ps = prompts(lens, seed=50)
    # three long ones among short ones: many sequences finish and join while the long ones hold rows
    budgets = [40, 3, 4, 35, 3, 4, 30, 3, 4, 3, 28, 4]
    greedy = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in budgets]
    kw = dict(block_size=4, num_blocks=24, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
    llm = LLM(nano, num_speculative_tokens=3, spec_disable_batch_size=2, **kw)
    audit = PrefixCacheAudit(llm.engine, nano).after_every_step()
    proposer, orig = llm.engine.proposer, llm.engine.proposer.propose
    scheduler, preempt = llm.engine.scheduler, llm.engine.scheduler._preempt
    seen = {"checked": 0, "rows": 0, "backlog": 0, "preempted_holding": 0}

    def propose(hidden, items, kmax, defer=False):
        for seq, _, _ in items:
            seen["backlog"] = max(seen["backlog"], len(seq.spec.held))
        ran = orig(hidden, items, kmax, defer)
        seen["rows"] = max(seen["rows"], 0 if proposer.held.buf is None else proposer.held.buf.shape[0])
        for (seq, _, _), k in zip(items, kmax):
            if k and seq.draft_token_ids:
                assert seq.draft_token_ids == ref_chain_drafts(nano, seq.token_ids, len(seq.draft_token_ids))
                seen["checked"] += 1
        return ran

    def counted_preempt(seq, out):
        seen["preempted_holding"] += bool(seq.spec and seq.spec.held)
        return preempt(seq, out)

    proposer.propose, scheduler._preempt = propose, counted_preempt
    outs = llm.generate(ps, greedy, use_tqdm=False)
    for o, p, n in zip(outs, ps, budgets):
        assert o.outputs[0].token_ids == ref_greedy(nano, p, n)
    m = llm.spec_metrics()
    assert m["paused_steps"] > 25 and m["verify_steps"] > 40 and seen["checked"] > 40
    assert seen["preempted_holding"] >= 2
    assert seen["rows"] <= 2 * 4 * 20 and seen["backlog"] == 20  # twice 4 sequences' rows at most; the bound held
    assert proposer.held.buf is None  # freed once every sequence had finished
    assert audit.checked > 100

    seeded = [SamplingParams(temperature=1.0, seed=60 + i, max_tokens=n, ignore_eos=True)
              for i, n in enumerate(budgets)]
    plain = LLM(nano, **kw).generate(ps, seeded, use_tqdm=False)
    paused = LLM(nano, num_speculative_tokens=3, spec_disable_batch_size=2, **kw).generate(ps, seeded, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in paused] == [o.outputs[0].token_ids for o in plain]
