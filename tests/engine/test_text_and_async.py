"""Text prompts, stop strings and streaming (sync engine deltas and the asyncio AsyncLLM), loading from disk."""

import asyncio

import pytest

from glm5.engine import LLM, AsyncLLM, SamplingParams
from glm5.engine.llm_engine import EngineConfig, LLMEngine

from .conftest import ref_greedy


@pytest.fixture(scope="module")
def llm(nano_dir):
    return LLM(str(nano_dir), max_num_seqs=4, block_size=4)


def test_load_from_directory_with_tokenizer(llm, text_model):
    nano = text_model[0]
    assert llm.tokenizer is not None
    out = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ids = llm.tokenizer.encode("Hello world")
    assert out.prompt == "Hello world" and out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == ref_greedy(nano, ids, 8)
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_stop_strings_cut_the_text(llm):
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The quick brown", sp)[0].outputs[0]
    text = full.text
    assert len(text) > 12
    stop = text[8:11]
    cut = text.find(stop)
    o = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    c = o[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[:cut]
    assert full.token_ids[: len(c.token_ids)] == c.token_ids and len(c.token_ids) < len(full.token_ids)
    o = llm.generate("The quick brown", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                                       include_stop_str_in_output=True))
    assert o[0].outputs[0].text == text[:cut + len(stop)]


def test_sync_delta_stream_concatenates_to_final(nano_dir):
    eng = LLMEngine.from_pretrained(nano_dir, config=EngineConfig(block_size=4))
    full = LLM(str(nano_dir)).generate("Hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop = full.outputs[0].text[10:13]
    eng.add_request("Hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]), request_id="s")
    text, ids, last = "", [], None
    while eng.has_unfinished_requests():
        for o in eng.step(delta=True):
            text += o.outputs[0].text
            ids += o.outputs[0].token_ids
            assert stop not in text  # held-back text never leaks past a stop string
            last = o
    assert last.finished and last.outputs[0].finish_reason == "stop"
    cut = full.outputs[0].text.find(stop)
    assert text == full.outputs[0].text[:cut]
    assert ids == full.outputs[0].token_ids[: len(ids)]


def test_async_streaming_abort_and_concurrency(nano_dir):
    sync = LLM(str(nano_dir))
    prompts = ["Hello world", "The quick", "GLM-5 uses"]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0] for o in sync.generate(prompts, sp)]

    async def main():
        llm = AsyncLLM.from_pretrained(str(nano_dir), max_num_seqs=4, block_size=4)
        bm = llm.engine.block_manager

        async def collect(i):
            text, ids, outs = "", [], []
            async for out in llm.generate(prompts[i], sp, request_id=f"r{i}"):
                text += out.outputs[0].text
                ids += out.outputs[0].token_ids
                outs.append(out)
            return text, ids, outs

        results = await asyncio.gather(*(collect(i) for i in range(3)))
        for (text, ids, outs), exp in zip(results, expected):
            assert text == exp.text and ids == exp.token_ids
            assert len(outs) > 3 and outs[-1].finished and not any(o.finished for o in outs[:-1])
            assert outs[-1].outputs[0].finish_reason == "length"
        # abort from outside: the stream ends with finish_reason "abort"
        got = []
        async for out in llm.generate("Hello", SamplingParams(max_tokens=200, ignore_eos=True), request_id="long"):
            got.append(out)
            if len(got) == 3:
                await llm.abort("long")
        assert got[-1].finished and got[-1].outputs[0].finish_reason == "abort" and len(got) < 50
        # closing a stream early aborts it too
        agen = llm.generate("Hello", SamplingParams(max_tokens=200, ignore_eos=True), request_id="closed")
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            if not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert not llm.engine.has_unfinished_requests()
        assert bm.num_free_blocks == bm.num_blocks - 1
        # invalid requests raise in the caller only
        with pytest.raises(ValueError):
            async for _ in llm.generate([1, 2, 99999], sp):
                pass
        text, ids, _ = await collect(0)
        assert ids == expected[0].token_ids
        llm.shutdown()

    asyncio.run(main())


def test_chat_renders_the_glm5_template_and_batches_conversations(llm):
    tok = llm.tokenizer
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, skip_special_tokens=False)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    one = llm.chat(conv, sp, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
    rendered = tok.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=False)
    assert one[0].prompt == rendered and rendered.endswith("</think>")
    assert one[0].outputs[0].token_ids == llm.generate(rendered, sp, use_tqdm=False)[0].outputs[0].token_ids
    two = llm.chat([conv, [{"role": "user", "content": "Hi"}]], sp, use_tqdm=False)  # thinking on by default
    assert [o.prompt for o in two] == [tok.apply_chat_template(c, add_generation_prompt=True)
                                       for c in (conv, [{"role": "user", "content": "Hi"}])]
    assert two[0].outputs[0].token_ids != [] and two[1].prompt.endswith("<think>")
    with pytest.raises(ValueError, match="no messages"):
        llm.chat([], sp)


def test_chat_without_a_tokenizer_is_refused(text_model):
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(text_model[0], max_model_len=64).chat([{"role": "user", "content": "hi"}])


def test_generate_shows_a_progress_bar_unless_told_not_to(llm, capsys):
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate(["a", "b", "c"], sp)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err and "tok/s" in err
    llm.generate(["a", "b"], sp, use_tqdm=False)
    assert capsys.readouterr().err == ""


def test_generate_takes_vllm_prompt_dicts(llm):
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = llm.get_tokenizer().encode("Hello world")
    outs = llm.generate([{"prompt": "Hello world"}, {"prompt_token_ids": ids}, ids], sp, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[0].prompt == "Hello world" and outs[1].prompt_token_ids == ids
    assert llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0].prompt_token_ids == ids
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate([{"text": "Hello"}], sp)
