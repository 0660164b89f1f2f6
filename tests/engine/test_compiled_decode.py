"""compile_decode on CPU: the engine's decode steps (plain decode, MTP verification, depth-1 drafts) run over the
static layout of glm5/engine/static_decode.py through torch.compile (inductor's C++ backend), and compute what the
eager engine and the no-cache model compute."""

import shutil

import pytest
import torch

from glm5.engine import LLM, SamplingParams, cpu_layout
from glm5.engine.static_decode import StaticDecodeRunner
from glm5.model.moe import expert_counts, grouped_linear

from .conftest import (TOPK, PrefixCacheAudit, decode_after_prefill, pack_every_head, prompts, ref_greedy,
                       watch_drafts)


# inductor's CPU backend builds C++ at run time
pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="torch.compile on CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles its own model: no guards left over from another
    yield
    torch._dynamo.reset()


def _count_static_steps(engine) -> list[tuple[int, int]]:
    """Wrap the static runner: the returned list gets (rows per sequence, sequences) of every step it ran."""
    graphs, ran = engine.runner.graphs, []
    orig = graphs.run_rows

    def run_rows(chunks, R, hidden=None):
        out = orig(chunks, R, hidden)
        if out is not None:
            ran.append((R, len(chunks)))
        return out

    graphs.run_rows = run_rows
    return ran


def test_compiled_grouped_linear_matches_the_grouped_product():
    # the MoE's compiled CPU form (each row's expert gathered into one batched product) against torch._grouped_mm
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, 12, generator=g)
    x = torch.randn(9, 12, generator=g)
    ids = torch.tensor([0, 0, 1, 3, 3, 3, 5, 5, 5])[:, None]  # rows already grouped by expert, as Experts sorts them
    counts = expert_counts(ids, 6)
    offs = counts.cumsum(0).to(torch.int32)
    want = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    got = torch.compile(grouped_linear, dynamic=True)(x, w, counts, offs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    eager_loop = grouped_linear(x, w, counts, offs)  # outside a compile: the eager paths, unchanged
    torch.testing.assert_close(eager_loop, want, rtol=0, atol=0)


def test_compiled_static_step_matches_eager_decode(nano):
    # prompts below and above index_topk; 3 sequences in a batch bucket of 4 (one padding row); keys padded to a
    # power of two of blocks, not to max_model_len
    runner, chunks, hidden = decode_after_prefill(nano, [5, 30, 13], seed=14)
    eager = runner.logits(hidden)
    static = StaticDecodeRunner(runner, max_num_seqs=4, max_model_len=80, capture=False, compile=True)
    assert static._key_blocks(chunks, 1) == 8 < static.max_blocks  # 30 tokens -> 8 blocks of 4, of 20
    compiled = static.run(chunks)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert compiled.argmax(-1).tolist() == eager.argmax(-1).tolist()


def _compilations() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _assert_left_as_new(engine) -> None:
    # compile_ahead's warm-up requests leave nothing behind
    assert not engine.requests and not engine.block_manager.hash_to_block and engine._next_id == 0
    assert all(v == 0 for v in engine.stats.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks - 1


@pytest.mark.parametrize("packed_head", [False, True])
def test_compile_decode_engine_greedy_equals_the_model(nano, packed_head, monkeypatch, tmp_path):
    # plain decode, batch 1 and 3, prompts shorter and longer than index_topk, every step after prefill compiled,
    # and compiled when the engine was built: the requests compile nothing. With the LM head packed for oneDNN
    # (glm5/engine/cpu_layout.py), batches of 2 and more leave the compiled graph for the head's product.
    if packed_head:
        pack_every_head(monkeypatch, tmp_path / "cpu_layout.json")
    ps = prompts([3, TOPK + 1, 3 * TOPK + 5], seed=21)
    llm = LLM(nano, max_num_seqs=4, block_size=4, compile_decode=True)
    assert isinstance(llm.engine.runner.head_linear, cpu_layout.PackedHead) == packed_head
    _assert_left_as_new(llm.engine)
    ran, compiled = _count_static_steps(llm.engine), _compilations()
    assert compiled > 0
    outs = llm.generate(ps[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    outs += llm.generate(ps[1:], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == ref_greedy(nano, p, 8)
    assert len(ran) >= 7 + 7 and {b for _, b in ran} >= {1, 2}  # 7 decode steps per generate, all compiled
    assert _compilations() == compiled


@pytest.mark.slow  # ~2 minutes of compilation on 2 cores each (the model and the MTP layer, batch 1 and dynamic)
@pytest.mark.parametrize("packed_head", [False, True])
def test_compile_decode_with_mtp_drafts_and_prefix_caching(nano, packed_head, monkeypatch, tmp_path):
    # MTP verification (R = k + 1) and depth-1 drafting (the catch-up, and the chained drafts in one step) through
    # the compiled step, with the prefix cache audited after every step: the compiled step writes the cache rows a
    # no-cache forward computes. With the packed head, batches of 2 and more leave the graph at each head product.
    if packed_head:
        pack_every_head(monkeypatch, tmp_path / "cpu_layout.json")
    ps = prompts([TOPK + 3, 2 * TOPK + 1], seed=22)
    llm = LLM(nano, max_num_seqs=4, block_size=4, num_speculative_tokens=3, compile_decode=True)
    _assert_left_as_new(llm.engine)
    audit = PrefixCacheAudit(llm.engine, nano).after_every_step()
    ran = _count_static_steps(llm.engine)
    graphs, chains = llm.engine.runner.graphs, []
    run_chain = graphs.run_chain
    graphs.run_chain = lambda chunks, *a: chains.append(len(chunks)) or run_chain(chunks, *a)
    drafts_ok = watch_drafts(llm.engine, nano)
    outs = llm.generate(ps + ps[:1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for p, o in zip(ps + ps[:1], outs):
        assert o.outputs[0].token_ids == ref_greedy(nano, p, 10)
    assert drafts_ok and all(drafts_ok)
    assert {r for r, _ in ran} >= {1, 4} and audit.checked > 0
    assert max(chains) >= 2  # drafts 2 and 3 of several sequences in one compiled step
