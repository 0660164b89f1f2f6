"""Sleep mode (``LLM.sleep`` / ``wake_up``): memory released while idle, and generation exactly as before after."""

import asyncio
import os

import pytest
import torch

from glm5.engine import LLM, EngineConfig, SamplingParams
from glm5.engine.llm_engine import LLMEngine

from .conftest import make_model

PROMPTS = [[5, 9, 2, 7, 11, 3, 8, 1, 4, 6, 13, 2, 9, 10, 12, 5, 7, 3], [1, 2, 3]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _engine(model, **kw) -> LLM:
    kw.setdefault("max_model_len", 64)
    kw.setdefault("block_size", 8)
    return LLM(model, **kw)


def _tokens(llm: LLM, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_level1_releases_the_cache_and_wakes_to_identical_output(nano, kv_cache_dtype):
    llm = _engine(nano, kv_cache_dtype=kv_cache_dtype)
    before = _tokens(llm)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8)
    before_sampled = _tokens(llm, sampled)
    kv = llm.engine.kv_cache
    assert kv.nbytes() > 0
    llm.sleep(level=1)
    assert llm.is_sleeping() and not kv.allocated and kv.nbytes() == 0
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.wake_up()
    assert not llm.is_sleeping() and kv.allocated
    assert _tokens(llm) == before
    assert _tokens(llm, sampled) == before_sampled


def test_sleep_forgets_the_prefix_cache(nano):
    llm = _engine(nano, enable_prefix_caching=True)
    long = [PROMPTS[0] * 2]
    llm.generate(long, GREEDY, use_tqdm=False)
    assert llm.generate(long, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0  # warm: the prefix is reused
    llm.sleep()
    llm.wake_up()
    # the blocks' contents were released: nothing may be matched against them
    assert llm.generate(long, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_level2_needs_weights_before_generating_then_matches(nano):
    state = {k: v.clone() for k, v in nano.state_dict().items()}
    model = make_model()
    llm = _engine(model)
    before = _tokens(llm)
    strides = {n: p.stride() for n, p in model.named_parameters()}
    llm.sleep(level=2)
    assert all(p.numel() == 0 for p in model.parameters())  # the weights' memory is gone, the modules remain
    llm.wake_up(["weights"])  # slime's order: weights first, then the update, then the cache
    assert llm.is_sleeping()
    assert {n: p.stride() for n, p in model.named_parameters()} == strides  # tuned CPU layouts are kept
    llm.wake_up(["kv_cache"])
    with pytest.raises(RuntimeError, match="not been loaded"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.load_weights(state)  # the RL weight path: copy_ into the state_dict tensors
    assert _tokens(llm) == before


def test_level2_names_parameters_a_partial_load_missed(nano):
    model = make_model()
    llm = _engine(model)
    llm.sleep(level=2)
    llm.wake_up()
    params = dict(model.named_parameters())
    skipped = "model.norm.weight"
    with torch.no_grad():
        for n, p in params.items():
            if n != skipped:
                p.data.copy_(dict(nano.named_parameters())[n])  # the p.data idiom: no version bump, NaN overwritten
    with pytest.raises(RuntimeError, match=skipped.replace(".", r"\.")):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    with torch.no_grad():
        params[skipped].data.copy_(nano.model.norm.weight)
    assert _tokens(llm) == _tokens(_engine(nano))


def test_level2_then_new_weights_equals_a_fresh_engine_on_them():
    old, new = make_model(seed=3), make_model(seed=11)
    llm = _engine(old)
    _tokens(llm)
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    llm.load_weights(new.state_dict().items())  # (name, tensor) pairs, as vLLM's load_weights takes
    llm.wake_up(["kv_cache"])
    assert _tokens(llm) == _tokens(_engine(make_model(seed=11)))


def test_speculative_engine_sleeps_and_wakes():
    model = make_model()  # its own: level 2 releases the weights of the model the engine runs
    llm = _engine(model, num_speculative_tokens=2)
    before = _tokens(llm)
    llm.sleep(level=2)
    llm.wake_up()
    llm.load_weights(make_model().state_dict())
    assert _tokens(llm) == before


def test_sleep_refuses_while_requests_run_and_loses_nothing(nano):
    eng = LLMEngine(nano, config=EngineConfig(max_model_len=64, block_size=8))
    rid = eng.add_request(PROMPTS[0], GREEDY)
    eng.step()
    with pytest.raises(RuntimeError, match="unfinished request"):
        eng.sleep()
    assert not eng.is_sleeping() and eng.kv_cache.allocated
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    ref = _tokens(_engine(nano))[0]
    assert [o.request_id for o in outs] == [rid] and outs[0].outputs[0].token_ids == ref


def test_bad_levels_and_tags_are_rejected(nano):
    llm = _engine(nano)
    for level in (0, 3, True, "1"):
        with pytest.raises(ValueError, match="sleep level"):
            llm.sleep(level)
    assert not llm.is_sleeping()
    llm.sleep()
    with pytest.raises(ValueError, match="unknown wake_up tag"):
        llm.wake_up(["weights", "optimizer"])
    assert llm.is_sleeping()  # nothing half-woken
    llm.wake_up("kv_cache")
    llm.wake_up("weights")
    assert not llm.is_sleeping()
    llm.wake_up()  # awake already: nothing to do


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_cpu_memory_goes_back_to_the_os(nano):
    # a cache of ~384 MiB in per-layer stores larger than glibc's mmap threshold, so freeing unmaps them
    llm = _engine(nano, max_model_len=64, kv_cache_memory=384 << 20)
    size = llm.engine.kv_cache.nbytes()
    assert size > 256 << 20
    held = _rss_bytes()
    llm.sleep()
    released = held - _rss_bytes()
    # not always all of it: glibc may keep some freed heap pages (tens of MiB, varying from cycle to cycle)
    assert released > 0.6 * size, (released, size)
    llm.wake_up()
    assert _rss_bytes() - (held - released) > 0.6 * size  # zeroed again: the pages are touched
    assert _tokens(llm) == _tokens(_engine(nano))


def test_async_engine_sleeps_between_steps(nano):
    from glm5.engine import AsyncLLM

    async def run():
        llm = AsyncLLM(LLMEngine(nano, config=EngineConfig(max_model_len=64, block_size=8)))

        async def tokens():
            out = []
            async for o in llm.generate(PROMPTS[0], GREEDY):
                out += o.outputs[0].token_ids
            return out

        before = await tokens()
        await llm.sleep()
        assert await llm.is_sleeping()
        with pytest.raises(RuntimeError, match="asleep"):  # reported to that request's caller only
            await tokens()
        await llm.wake_up()
        after = await tokens()
        llm.shutdown()
        return before, after

    before, after = asyncio.run(run())
    assert after == before


def test_load_weights_in_place(nano):
    model = make_model()
    llm = _engine(model, enable_prefix_caching=True)
    before = _tokens(llm)
    long = [PROMPTS[0] * 2]
    llm.generate(long, GREEDY, use_tqdm=False)
    new = make_model(seed=11).state_dict()
    assert llm.load_weights(new) == len(new)
    assert llm.generate(long, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0  # latents of the old weights
    assert _tokens(llm) == _tokens(_engine(make_model(seed=11)))
    llm.load_weights(nano.state_dict())
    assert _tokens(llm) == before


def test_bad_weights_raise_and_change_nothing(nano):
    model = make_model()
    llm = _engine(model)
    before = _tokens(llm)
    good = make_model(seed=11).state_dict()
    name = "model.layers.0.self_attn.o_proj.weight"
    bad = [({**good, "model.bogus": torch.zeros(1)}, KeyError, "unexpected"),
           ({k: v for k, v in good.items() if k != name}, KeyError, "missing"),
           ({**good, name: good[name][:, :-1]}, ValueError, "shape")]
    for weights, err, match in bad:
        with pytest.raises(err, match=match):
            llm.load_weights(weights)
        assert _tokens(llm) == before  # checked before the first copy: the model is untouched
    # strict=False: a subset (here one tensor) loads, unknown names are skipped
    assert llm.load_weights({name: good[name], "model.bogus": torch.zeros(1)}, strict=False) == 1
    assert torch.equal(dict(model.named_parameters())[name], good[name])
    llm.sleep(level=2)
    with pytest.raises(RuntimeError, match="asleep"):
        llm.load_weights(good)


def test_weights_loaded_after_a_level2_wake_survive_a_level1_sleep(nano):
    # load, then sleep again at level 1 before any step: the new weights are kept (offloaded), not discarded
    model = make_model(seed=11)
    llm = _engine(model)
    llm.sleep(level=2)
    llm.wake_up()
    llm.load_weights(nano.state_dict())
    llm.sleep(level=1)
    assert all(p.numel() > 0 for p in model.parameters())  # CPU level 1: the weights stay where they are
    llm.wake_up()
    assert _tokens(llm) == _tokens(_engine(nano))
