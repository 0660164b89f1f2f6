import json

import pytest

from glm5.tokenizer import GLM5_CHAT_TEMPLATE, GLM5Tokenizer, SPECIAL_TOKEN_STRINGS
from glm5.tokenizer.special_tokens import SPECIAL_TOKENS

SAMPLES = [
    "Hello world!",
    "def f(x):\n    return x ** 2  # 12345\n",
    "你好，世界。模型推理 🙂🚀 café",
    "[gMASK]<sop><|user|>hi<|assistant|><think>r</think>a<tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>",
    "  leading and trailing spaces   \n\n\t",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in 北京?"},
    {
        "role": "assistant",
        "reasoning_content": "Need the tool.",
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 2}}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 18}'},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    }
]


def test_save_load_round_trip(trained, saved_dir):
    loaded = GLM5Tokenizer.from_pretrained(saved_dir)
    assert loaded.fingerprint() == trained.fingerprint()
    assert loaded.vocab_size == trained.vocab_size
    assert loaded.eos_token_ids == trained.eos_token_ids
    assert loaded.pad_token_id == trained.pad_token_id
    assert loaded.chat_template == GLM5_CHAT_TEMPLATE and loaded.uses_builtin_template
    for text in SAMPLES:
        assert loaded.encode(text) == trained.encode(text)
    # saving again changes nothing
    again = saved_dir.parent / "again"
    loaded.save_pretrained(again)
    assert (again / "tokenizer.json").read_bytes() == (saved_dir / "tokenizer.json").read_bytes()
    assert json.loads((again / "tokenizer_config.json").read_text()) == json.loads(
        (saved_dir / "tokenizer_config.json").read_text()
    )


def test_tokenizer_config_contents(trained, saved_dir):
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend"
    assert config["eos_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["chat_template"] == GLM5_CHAT_TEMPLATE
    base = trained.token_to_id("<|endoftext|>")
    decoder = config["added_tokens_decoder"]
    assert len(decoder) == 36
    for i, spec in enumerate(SPECIAL_TOKENS):
        entry = decoder[str(base + i)]
        assert entry["content"] == spec.content and entry["special"] == spec.special
    assert config["extra_special_tokens"] == [t.content for t in SPECIAL_TOKENS if t.special]
    special_map = json.loads((saved_dir / "special_tokens_map.json").read_text())
    assert special_map == {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def test_transformers_autotokenizer_same_ids(trained, hf_tokenizer):
    for text in SAMPLES:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == trained.encode(text)
        ids = trained.encode(text)
        assert hf_tokenizer.decode(ids) == trained.decode(ids)
    assert hf_tokenizer.eos_token_id == trained.eos_token_ids[0]
    assert hf_tokenizer.pad_token_id == trained.pad_token_id
    assert hf_tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKEN_STRINGS)) == [
        trained.token_to_id(t) for t in SPECIAL_TOKEN_STRINGS
    ]
    assert len(hf_tokenizer) == trained.vocab_size
    # reasoning/tool tags survive skip_special_tokens in both; role tokens do not
    ids = trained.encode("[gMASK]<|user|>x<think>y</think><tool_call>z</tool_call>")
    assert trained.decode(ids, skip_special_tokens=True) == "x<think>y</think><tool_call>z</tool_call>"
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == trained.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_transformers_chat_template_same_rendering(trained, hf_tokenizer, enable_thinking):
    ours = trained.apply_chat_template(CONVERSATION, tools=TOOLS, enable_thinking=enable_thinking)
    theirs = hf_tokenizer.apply_chat_template(
        CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking
    )
    assert ours == theirs
    ids = trained.apply_chat_template(CONVERSATION, tools=TOOLS, enable_thinking=enable_thinking, tokenize=True)
    assert ids == trained.encode(ours) == hf_tokenizer.encode(theirs, add_special_tokens=False)
    assert ids[:2] == [trained.token_to_id("[gMASK]"), trained.token_to_id("<sop>")]


def test_apply_chat_template_normalizes_json_string_arguments(trained):
    as_string = json.loads(json.dumps(CONVERSATION))
    as_string[2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "北京", "days": 2})
    assert trained.apply_chat_template(as_string, tools=TOOLS) == trained.apply_chat_template(CONVERSATION, tools=TOOLS)


def test_official_layout_loads_unchanged(trained, tmp_path):
    """A dir shaped like zai-org/GLM-5's: its own template file and tokenizer_config fields are used as is."""
    trained.backend.save(str(tmp_path / "tokenizer.json"))
    original = (tmp_path / "tokenizer.json").read_bytes()
    config = {
        "backend": "tokenizers",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "TokenizersBackend",
        "model_max_length": 1048576,
        "chat_template": "ignored: the .jinja file wins",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ '</think>' if enable_thinking is defined and not enable_thinking else '<think>' }}{% endif %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    tok = GLM5Tokenizer.from_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == original
    assert tok.chat_template == template and not tok.uses_builtin_template
    assert tok.config["model_max_length"] == 1048576
    assert tok.eos_token_ids == trained.eos_token_ids
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "[user]hi<|assistant|><think>"
    assert tok.apply_chat_template(msgs, enable_thinking=False) == "[user]hi<|assistant|></think>"
    assert tok.apply_chat_template(msgs, enable_thinking=None) == "[user]hi<|assistant|><think>"
    for text in SAMPLES:
        assert tok.encode(text) == trained.encode(text)
    # saving keeps the unknown config fields and moves the template into tokenizer_config.json
    out = tmp_path / "resaved"
    tok.save_pretrained(out)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 1048576 and saved["chat_template"] == template
    assert not (out / "chat_template.jinja").exists()
    assert GLM5Tokenizer.from_pretrained(out).fingerprint() == tok.fingerprint()


def test_named_template_list_in_config(trained, tmp_path):
    trained.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert GLM5Tokenizer.from_pretrained(tmp_path).chat_template == "D"


def test_fingerprint(trained, corpus):
    fp = trained.fingerprint()
    assert len(fp) == 64 and fp == trained.fingerprint()
    other_template = GLM5Tokenizer(trained.backend, chat_template="{{ messages }}")
    assert other_template.fingerprint() != fp
    assert other_template.fingerprint(include_chat_template=False) == trained.fingerprint(include_chat_template=False)
    from glm5.tokenizer import train_bpe

    assert train_bpe(corpus, vocab_size=700).fingerprint() != fp


def test_generation_config_and_repr(trained):
    base = trained.token_to_id("<|endoftext|>")
    assert trained.generation_config() == {"eos_token_id": [base, base + 7, base + 9], "pad_token_id": base}
    assert "GLM5Tokenizer" in repr(trained)
    assert trained.special_token_ids["<think>"] == base + 21
    assert trained.encode_batch(["a b", "c"]) == [trained.encode("a b"), trained.encode("c")]


def _official_dir(trained, path):
    trained.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return path


@pytest.mark.parametrize("name, content, match", [
    ("tokenizer.json", "{not json", r"tokenizer\.json: not a valid tokenizer: "),  # was a bare Exception
    ("tokenizer.json", "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n", "Git LFS pointer"),
    ("tokenizer_config.json", "{", r"tokenizer_config\.json: invalid JSON"),  # named no file
    ("tokenizer_config.json", "[]", r"tokenizer_config\.json: must hold a JSON object"),  # was a TypeError
    ("chat_template.jinja", "{% for m in messages %}{{ m.content }", r"chat_template\.jinja: chat template syntax error at line 1"),
    ("chat_template.jinja", "\n", r"chat_template\.jinja: the chat template is empty"),
])
def test_broken_tokenizer_files_are_named_at_load(trained, tmp_path, name, content, match):
    d = _official_dir(trained, tmp_path)
    (d / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        GLM5Tokenizer.from_pretrained(d)


def test_template_in_tokenizer_config_is_checked_and_a_bom_is_not_rendered(trained, tmp_path):
    d = _official_dir(trained, tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat template syntax error"):
        GLM5Tokenizer.from_pretrained(d)
    (d / "tokenizer_config.json").write_text("{}")
    (d / "chat_template.jinja").write_bytes(b"\xef\xbb\xbf[{{ messages[0].content }}]")  # saved by a BOM-writing editor
    assert GLM5Tokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


def test_a_vocabulary_without_eos_tokens_warns_at_load(tmp_path, caplog):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with caplog.at_level("WARNING", logger="glm5.tokenizer.tokenizer"):
        tok = GLM5Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_ids == []
    assert "no EOS token" in caplog.text and "tokenizer.json" in caplog.text
