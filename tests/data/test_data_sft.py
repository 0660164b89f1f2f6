import collections
import json
import random

import pytest

from glm5.data.loader import BatchLoader, ConversationRows
from glm5.data.sft import (IDK, build_sft_dataset, default_sft_conversations, load_sft_split, read_conversations,
                           render_conversation, render_record, worked_arithmetic)


def _trained_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_single_turn_mask_is_exactly_the_assistant(small_tokenizer):
    tok = small_tokenizer
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "reasoning_content": "2 + 3 = 5.", "content": "5"}]
    ids, mask = render_conversation(tok, msgs)
    full = tok.apply_chat_template(msgs, add_generation_prompt=False, clear_thinking=False)
    assert ids[:-1] == tok.encode(full)  # the pieces tokenise exactly like the whole text
    assert tok.decode(ids[-1:]) == "<|user|>"  # the turn's stop token (a GLM-5 EOS) is appended
    assert _trained_text(tok, ids, mask) == "<think>2 + 3 = 5.</think>5<|user|>"
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert prompt == "[gMASK]<sop><|system|>Be brief.<|user|>What is 2 + 3?<|assistant|>"


def test_multi_turn_tool_calls(small_tokenizer):
    tok = small_tokenizer
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "Add 2 and 3 with the tool."},
            {"role": "assistant", "reasoning_content": "Call add.", "content": "",
             "tool_calls": [{"function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "It is 5."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "reasoning_content": "Polite.", "content": "You're welcome."}]
    ids, mask = render_conversation(tok, msgs, tools)
    trained = _trained_text(tok, ids, mask)
    assert trained == ("<think>Call add.</think><tool_call>add<arg_key>a</arg_key><arg_value>2</arg_value>"
                       "<arg_key>b</arg_key><arg_value>3</arg_value></tool_call><|observation|>"
                       "</think>It is 5.<|user|><think>Polite.</think>You're welcome.<|user|>")
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<tool_response>5</tool_response>" in untrained and "Thanks" in untrained and "# Tools" in untrained
    # Earlier turns keep their reasoning (interleaved thinking), so every turn is rendered as trained.
    full = tok.apply_chat_template(msgs, tools, add_generation_prompt=False, clear_thinking=False)
    assert ids[:-1] == tok.encode(full)


def test_needs_an_assistant_turn(small_tokenizer):
    with pytest.raises(ValueError, match="assistant"):
        render_conversation(small_tokenizer, [{"role": "user", "content": "hi"}])


def test_worked_arithmetic_is_correct():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 6)
        expr = str(rng.randint(-99, 99))
        for _ in range(n - 1):
            expr += f" {rng.choice('+-*')} {rng.randint(-99, 99)}"
        if rng.random() < 0.3:
            expr = f"-( {expr} ) * 2"
        reasoning, answer = worked_arithmetic(expr)
        assert int(answer) == eval(expr)
        assert reasoning.strip().endswith(f"{answer}.")
    r, a = worked_arithmetic("( 6915 / 5 ) - 7652")
    assert a == str(6915 // 5 - 7652) and "6915 / 5 = 1383" in r


def test_default_sft_set():
    rg = pytest.importorskip("reasoning_gym")
    convs = default_sft_conversations(200, seed=1)
    assert len(convs) == 200
    kinds = collections.Counter(c["meta"]["task"] for c in convs)
    assert kinds["unanswerable"] == 30 and kinds["calculator_tool"] == 20
    assert len(kinds) >= 8  # seven reasoning-gym tasks + the two extra kinds
    for c in convs:
        final = c["messages"][-1]
        assert final["role"] == "assistant" and final["reasoning_content"].strip()
        if c["meta"]["task"] == "unanswerable":
            assert final["content"] == IDK
    # Answers are right: reasoning-gym's own scorer accepts them.
    for name in ("basic_arithmetic", "gsm_symbolic", "leg_counting", "gcd", "lcm"):
        ds = rg.create_dataset(name, size=1, seed=0)
        items = [c for c in convs if c["meta"]["task"] == name][:5]
        assert items
        for c in items:
            q = c["messages"][0]["content"]
            entry = {"question": q, "answer": c["meta"]["answer"], "metadata": {}}
            assert ds.score_answer(answer=c["messages"][-1]["content"], entry=entry) == 1.0
    assert [c["messages"] for c in default_sft_conversations(50, seed=1)] == \
        [c["messages"] for c in default_sft_conversations(50, seed=1)]


def test_build_sft_dataset_round_trip(tmp_path, small_tokenizer):
    pytest.importorskip("reasoning_gym")
    tok = small_tokenizer
    convs = default_sft_conversations(40, seed=0)
    m = build_sft_dataset(convs, tok, tmp_path / "sft", val_fraction=0.1)
    assert m["splits"]["val"]["conversations"] == 4 and m["splits"]["train"]["conversations"] == 36
    t, mask, offsets, _ = load_sft_split(tmp_path / "sft", "train")
    assert len(offsets) == 37 and offsets[-1] == len(t) == len(mask)
    assert 0 < mask.sum() < len(mask)
    rows = ConversationRows(t, mask, offsets, seq_len=512, pad_id=tok.pad_token_id)
    loader = BatchLoader(rows, 2, seed=0)
    b = next(loader)
    lab = b.labels[b.labels != -100]
    # Everything the batch trains on is assistant text: the trained tokens decode to reasoning / answers.
    text = tok.decode(lab.tolist())
    assert "<think>" in text and "<|assistant|>" not in text and "[gMASK]" not in text
    assert b.attention_mask is not None
    # Every conversation of the split is used exactly once per epoch.
    specs = rows.epoch_rows(0, 0, True)
    assert sorted(c for s in specs for c in s) == list(range(36))


def test_text_records_train_every_token_and_mix_with_conversations(tmp_path, small_tokenizer):
    tok = small_tokenizer
    doc = "ROMEO. But soft, what light through yonder window breaks?"
    ids, mask = render_record(tok, {"text": doc})
    assert ids == tok.encode(doc) + [tok.eos_token_id] and all(mask)  # as a pretraining document
    conv = {"messages": [{"role": "user", "content": "Calculate 2 + 3."},
                         {"role": "assistant", "reasoning_content": "2 + 3 = 5.", "content": "5"}]}
    assert render_record(tok, conv) == render_conversation(tok, conv["messages"])
    f = tmp_path / "mix.jsonl"
    f.write_text(json.dumps(conv) + "\n" + json.dumps({"text": doc}) + "\n")
    recs = read_conversations([f])
    build_sft_dataset(recs, tok, tmp_path / "sft", val_fraction=0)
    t, m, offsets, man = load_sft_split(tmp_path / "sft", "train")
    assert man["splits"]["train"]["conversations"] == 2
    text_ids = t[offsets[1]:offsets[2]].tolist()
    assert text_ids == ids and m[offsets[1]:offsets[2]].all()
    assert not m[offsets[0]:offsets[1]].all()  # the conversation's prompt stays untrained
    # a record that is neither a conversation nor a non-empty text is rejected with its line number
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conv) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_conversations([bad])
