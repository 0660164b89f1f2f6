"""A user's own data, as it comes: other field names, non-UTF-8 bytes, wrong column types, malformed SFT rows.
Each problem is one clear error naming the file (and line), or is read leniently where that is the rule."""

import json

import numpy as np
import pytest

from glm5.data.corpus import iter_documents, resolve_sources
from glm5.data.sft import build_sft_dataset, read_conversations
from glm5.data.tokenize import unigram_baseline

CONV = {"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]}


def test_jsonl_invalid_utf8_is_replaced_like_txt(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "caf\xe9 ok"}\n{"text": "fine"}\n')
    assert [d.text for d in iter_documents(resolve_sources(f))] == ["caf\ufffd ok", "fine"]


def test_jsonl_missing_field_names_the_fields_and_the_flag(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"content": "a play", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: no field 'text' \(fields: content, id; --text-field"):
        list(iter_documents(resolve_sources(f)))
    assert [d.text for d in iter_documents(resolve_sources(f), text_field="content")] == ["a play"]


def test_parquet_non_text_column_is_a_clear_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), f)
    with pytest.raises(ValueError, match=r"d.parquet: column 'text' holds int64, not text"):
        list(iter_documents(resolve_sources(f)))
    assert [d.text for d in iter_documents(resolve_sources(f), text_field="body")] == ["a", "b", "c"]
    g = tmp_path / "e.parquet"  # dictionary-encoded strings are text too
    pq.write_table(pa.table({"text": pa.array(["x", "y", "x"]).dictionary_encode()}), g)
    assert [d.text for d in iter_documents(resolve_sources(g))] == ["x", "y", "x"]


def test_unigram_baseline_without_validation_text_is_none_not_nan():
    u = unigram_baseline(np.arange(8), np.zeros(0, dtype=np.int64), 8)
    assert u["val_cross_entropy"] is None
    json.loads(json.dumps(u, allow_nan=False))  # valid JSON


@pytest.mark.parametrize("line, match", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"\n', r"bad.jsonl:2: invalid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}),
     r"bad.jsonl:2: message 1: unsupported role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"bad.jsonl:2: .*at least one assistant"),
    (json.dumps({"messages": []}), r"bad.jsonl:2: 'messages' must be a non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}), r"bad.jsonl:2: "),
])
def test_malformed_sft_rows_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(CONV) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_conversations([f])


def test_sft_reads_non_utf8_leniently_and_rejects_non_jsonl(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}\n')
    assert read_conversations([f])[0]["messages"][0]["content"] == "caf\ufffd"
    t = tmp_path / "notes.txt"
    t.write_text("plain text\n")
    with pytest.raises(ValueError, match=r"notes.txt: SFT data must be .jsonl"):
        read_conversations([t])


def test_build_sft_dataset_bad_record_leaves_no_debris(tmp_path, small_tokenizer):
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValueError, match="SFT record 1: .*assistant"):
        build_sft_dataset([CONV, bad], small_tokenizer, tmp_path / "sft")
    assert list(tmp_path.iterdir()) == []


def test_sharegpt_alpaca_and_json_array_files_become_conversations(tmp_path, small_tokenizer):
    from glm5.data.sft import render_record

    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    sharegpt = {"system": "Be terse.", "tools": json.dumps(tools), "conversations": [
        {"from": "human", "value": "2+3?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
        {"from": "observation", "value": "5"},
        {"from": "gpt", "value": "5"}]}
    alpaca = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    f = tmp_path / "mixed.json"  # a JSON array, as ShareGPT / Alpaca dumps usually are
    f.write_text(json.dumps([sharegpt, alpaca, CONV]))
    a, b, c = read_conversations([f])
    assert [m["role"] for m in a["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert a["tools"] == tools and a["messages"][2]["tool_calls"][0]["function"]["name"] == "add"
    assert b["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                             {"role": "assistant", "content": "5"}]
    assert c == CONV
    # they render like the equivalent OpenAI-style conversation, with the loss on the assistant's turns only
    ids, mask = render_record(small_tokenizer, a)
    text = small_tokenizer.decode(ids, skip_special_tokens=False)
    assert any(mask) and not all(mask) and "<tool_call>add<arg_key>a</arg_key><arg_value>2</arg_value>" in text
    build_sft_dataset([a, b, c], small_tokenizer, tmp_path / "sft", val_fraction=0)
    # mistakes name the record
    g = tmp_path / "bad.json"
    g.write_text(json.dumps([alpaca, {"conversations": [{"from": "narrator", "value": "x"}]}]))
    with pytest.raises(ValueError, match=r"bad.json:record 2: conversations\[0\]: unknown speaker 'narrator'"):
        read_conversations([g])
    g.write_text(json.dumps([{"prompt": "x", "completion": "y"}]))
    with pytest.raises(ValueError, match=r"record 1: expected 'messages', ShareGPT"):
        read_conversations([g])
    g.write_text("[1, 2")
    with pytest.raises(ValueError, match=r"bad.json:1: invalid JSON"):
        read_conversations([g])
    g.write_text(json.dumps(alpaca) + "\n" + json.dumps(CONV) + "\n")  # JSON Lines named .json
    assert read_conversations([g])[1] == CONV
    sep = {"instruction": "a\u2028b", "output": "c\x85d"}  # raw line separators inside strings are not line ends
    (tmp_path / "sep.jsonl").write_text(json.dumps(sep, ensure_ascii=False) + "\r\n" + json.dumps(CONV) + "\r\n")
    assert read_conversations([tmp_path / "sep.jsonl"])[0]["messages"][0]["content"] == "a\u2028b"
