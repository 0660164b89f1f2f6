"""``glm5 generate`` and ``glm5 chat`` (run in-process through the real CLI dispatcher)."""

import builtins

from glm5.cli import main
from glm5.engine import LLM, SamplingParams

from .conftest import ref_greedy


def test_generate_token_ids_without_tokenizer(tmp_path, nano, capsys):
    nano.save_pretrained(tmp_path)
    # the CUDA-graph flags are accepted and ignored on CPU (nothing CUDA-only on the CPU path)
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "5,6,7,8", "--max-tokens", "6",
                 "--ignore-eos", "--stats", "--enforce-eager", "--compile-decode"]) == 0
    out = capsys.readouterr()
    assert [int(x) for x in out.out.split()] == ref_greedy(nano, [5, 6, 7, 8], 6)
    assert "6 tokens" in out.err


def test_generate_with_fp8_kv_cache(tmp_path, nano, capsys):
    nano.save_pretrained(tmp_path)
    args = ["generate", "--model", str(tmp_path), "--prompt-ids", ",".join(map(str, range(5, 45))), "--max-tokens", "6",
            "--ignore-eos"]
    assert main(args + ["--kv-cache-dtype", "fp8"]) == 0
    got = [int(x) for x in capsys.readouterr().out.split()]
    expected = LLM(nano, kv_cache_dtype="fp8").generate([{"prompt_token_ids": list(range(5, 45))}],
                                                         SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert got == expected[0].outputs[0].token_ids


def test_generate_text_streams(nano_dir, capsys):
    assert main(["generate", "--model", str(nano_dir), "--prompt", "Hello world", "--max-tokens", "12",
                 "--ignore-eos", "--spec-tokens", "2"]) == 0
    expected = LLM(str(nano_dir)).generate("Hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                         skip_special_tokens=False))
    assert capsys.readouterr().out == expected[0].outputs[0].text + "\n"


def test_chat_uses_the_chat_format(nano_dir, capsys, monkeypatch):
    lines = iter(["hi there", "/reset", "/help", "second question", "/exit"])
    prompts = []
    from glm5.engine.llm_engine import LLMEngine

    orig = LLMEngine.add_request

    def spy(self, prompt, params=None, request_id=None):
        prompts.append(prompt)
        return orig(self, prompt, params, request_id)

    monkeypatch.setattr(LLMEngine, "add_request", spy)
    monkeypatch.setattr(builtins, "input", lambda *_: next(lines))
    assert main(["chat", "--model", str(nano_dir), "--max-tokens", "5", "--temperature", "0", "--system", "Be brief."]) == 0
    assert prompts[0] == "[gMASK]<sop><|system|>Be brief.<|user|>hi there<|assistant|><think>"
    assert prompts[1] == "[gMASK]<sop><|system|>Be brief.<|user|>second question<|assistant|><think>"  # after /reset
    assert len(prompts) == 2  # /help is answered by the CLI, not sent to the model
    cap = capsys.readouterr()
    assert cap.out.count("\n") >= 2 and "anything else is your message" in cap.err  # one streamed answer per turn
