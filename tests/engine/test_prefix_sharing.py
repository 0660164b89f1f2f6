"""Prefix-cache blocks are registered when the step that fills them is scheduled (as vLLM does), so identical prompts
admitted together (``n > 1``, an RL group sent as separate requests) compute the prompt once; a request that ends in
its first step still leaves its prompt cached; a step that fails takes its registrations back."""

import pytest

from glm5.engine import LLM, SamplingParams

from .conftest import PrefixCacheAudit, count_forward_rows, prompts, ref_chain_drafts, ref_greedy, ref_mtp_drafts, watch_drafts

DRAFTS = {"recursive": ref_mtp_drafts, "chain": ref_chain_drafts}
BS = 4
# engine settings: plain; MTP chained and recursive; MTP paused by a batch of more than one sequence
ENGINES = {
    "plain": {},
    "chain": dict(num_speculative_tokens=3),
    "recursive": dict(num_speculative_tokens=3, mtp_draft_mode="recursive"),
    "paused": dict(num_speculative_tokens=3, spec_disable_batch_size=1),
}


def _extra(kw: dict) -> int:
    """Tokens after a block that join its hash: the MTP cache depths (depth d's entry at s reads x_{s+d})."""
    k = kw.get("num_speculative_tokens", 0)
    return k if kw.get("mtp_draft_mode") == "recursive" else min(1, k)


def _shared(prompt_len: int, kw: dict) -> int:
    """Prompt tokens a later identical prompt finds cached: whole blocks, one token left to compute."""
    return (prompt_len - 1 - _extra(kw)) // BS * BS


@pytest.mark.parametrize("name", list(ENGINES))
def test_identical_prompts_admitted_in_one_step_compute_the_prompt_once(nano, name):
    kw = ENGINES[name]
    p = prompts([23], seed=40)[0]
    other = prompts([17], seed=41)[0]
    llm = LLM(nano, block_size=BS, max_num_seqs=8, **kw)
    checked = watch_drafts(llm.engine, nano, DRAFTS[kw.get("mtp_draft_mode", "chain")]) if kw else None
    rows = count_forward_rows(llm)
    sp = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    outs = llm.generate([p, other, p, p], sp)  # an unrelated prompt between the copies
    ref = ref_greedy(nano, p, 7)
    for o in (outs[0], outs[2], outs[3]):
        assert o.outputs[0].token_ids == ref
    assert outs[1].outputs[0].token_ids == ref_greedy(nano, other, 7)
    assert [o.num_cached_tokens for o in outs] == [0, 0, _shared(23, kw), _shared(23, kw)]
    # the first step's forward: the prompt once, the other prompt, and each copy's uncached tail
    assert rows[0] == 23 + 17 + 2 * (23 - _shared(23, kw))
    if kw:  # then alone (drafting even where the batch paused it): its drafts read the group's cached MTP entries
        later = llm.generate([p + [9]], sp)[0]
        assert later.num_cached_tokens == _shared(24, kw) and later.outputs[0].token_ids == ref_greedy(nano, p + [9], 7)
        assert len(checked) > 3 and all(checked)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks - 1


@pytest.mark.parametrize("name", ["plain", "chain", "paused"])
def test_n_completions_share_the_prompt_and_seeded_samples_do_not_change(nano, name):
    kw = ENGINES[name]
    p = prompts([21], seed=42)[0]
    sp = SamplingParams(n=4, temperature=0.9, seed=7, max_tokens=6, ignore_eos=True)
    shared = LLM(nano, block_size=BS, max_num_seqs=8, **kw).generate([p], sp)[0]
    alone = LLM(nano, block_size=BS, max_num_seqs=8, enable_prefix_caching=False, **kw).generate([p], sp)[0]
    assert [c.token_ids for c in shared.outputs] == [c.token_ids for c in alone.outputs]
    assert len({tuple(c.token_ids) for c in shared.outputs}) > 1  # really different samples
    engine = LLM(nano, block_size=BS, max_num_seqs=8, **kw)
    rows = count_forward_rows(engine)
    cold = engine.generate([p], sp)[0]
    assert rows[0] == 21 + 3 * (21 - _shared(21, kw))  # the prompt once, then each sibling's uncached tail
    # the request's cached tokens: what it found cached, not what its completions shared among themselves
    assert cold.num_cached_tokens == alone.num_cached_tokens == 0
    assert engine.generate([p], sp)[0].num_cached_tokens == _shared(21, kw)  # now it is cached


@pytest.mark.parametrize("name", list(ENGINES))
def test_a_request_that_ends_in_its_first_step_leaves_its_prompt_cached(nano, name):
    """max_tokens=1 (scoring, classification): the prompt's blocks were never published before, because a
    sequence finishing in a step registered nothing (and with MTP its MTP entries were never made)."""
    kw = ENGINES[name]
    p = prompts([26], seed=43)[0]
    llm = LLM(nano, block_size=BS, **kw)
    checked = watch_drafts(llm.engine, nano, DRAFTS[kw.get("mtp_draft_mode", "chain")]) if kw else None
    first = llm.generate([p, prompts([9], seed=44)[0]], SamplingParams(temperature=0, max_tokens=1))
    assert first[0].outputs[0].token_ids == ref_greedy(nano, p, 1)
    again = llm.generate([p + [5, 6]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert again.num_cached_tokens == _shared(26, kw)
    assert again.outputs[0].token_ids == ref_greedy(nano, p + [5, 6], 6)
    if kw:  # drafts read the MTP entries the one-step request left behind (made even by a paused proposer)
        assert checked and all(checked)


@pytest.mark.parametrize("name", ["chain", "recursive", "paused"])
def test_blocks_left_by_a_one_step_request_hold_final_mtp_entries(nano, name):
    """The blocks a one-step request leaves registered hold, in every layer (MTP included), the entries a no-cache
    forward computes: they were finalised although the request ended in the step that registered them."""
    kw = ENGINES[name]
    p = prompts([26], seed=47)[0]
    one = LLM(nano, block_size=BS, **kw)
    audit = PrefixCacheAudit(one.engine, nano)
    one.generate([p, prompts([9], seed=48)[0]], SamplingParams(temperature=0, max_tokens=1))
    audit.check()
    # every whole block of both prompts whose hashed tokens exist (the extra ones may include the sampled token)
    assert audit.checked == (27 - _extra(kw)) // BS + (10 - _extra(kw)) // BS


def _nth_call_raises(n: int):
    calls = {"n": 0}

    def proc(ids, lg):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("boom")
        return lg
    return proc


@pytest.mark.parametrize("name", ["plain", "chain"])
def test_a_failed_sequence_takes_its_registrations_back(nano, name):
    kw = ENGINES[name]
    p = prompts([22], seed=45)[0]
    llm = LLM(nano, block_size=BS, **kw)
    bad = SamplingParams(temperature=0, max_tokens=4, logits_processors=[_nth_call_raises(1)])
    out = llm.generate([p], bad)[0]
    assert out.outputs[0].finish_reason == "error" and "boom" in out.outputs[0].stop_reason
    bm = llm.engine.block_manager
    assert not bm.hash_to_block and all(h is None for h in bm.block_hash)
    again = llm.generate([p], SamplingParams(temperature=0, max_tokens=3))[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == ref_greedy(nano, p, 3)


def test_a_step_that_raises_takes_its_registrations_back(nano):
    llm = LLM(nano, block_size=BS)
    runner = llm.engine.runner

    def broken(ids, pos, batch):
        raise RuntimeError("device lost")

    runner.forward = broken
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([prompts([19], seed=46)[0]], SamplingParams(temperature=0, max_tokens=2))
    bm = llm.engine.block_manager
    assert not bm.hash_to_block and all(h is None for h in bm.block_hash)
