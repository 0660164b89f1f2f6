from glm5.tokenizer import special_tokens as st
from glm5.tokenizer.parser import TERMINATORS


def test_official_inventory():
    assert len(st.SPECIAL_TOKENS) == 36
    assert len(set(st.SPECIAL_TOKEN_STRINGS)) == 36
    known = {
        "<|endoftext|>": 154820,
        "[gMASK]": 154822,
        "<sop>": 154824,
        "<|system|>": 154826,
        "<|user|>": 154827,
        "<|assistant|>": 154828,
        "<|observation|>": 154829,
        "<|code_prefix|>": 154838,
        "<think>": 154841,
        "</think>": 154842,
        "<tool_call>": 154843,
        "</tool_call>": 154844,
        "<tool_response>": 154845,
        "</tool_response>": 154846,
        "<arg_key>": 154847,
        "</arg_key>": 154848,
        "<arg_value>": 154849,
        "</arg_value>": 154850,
        "/nothink": 154851,
        "<|video|>": 154855,
    }
    for token, token_id in known.items():
        assert st.official_id(token) == token_id


def test_eos_and_special_flags():
    assert [st.official_id(t) for t in st.EOS_TOKENS] == [154820, 154827, 154829]
    assert st.official_id(st.PAD_TOKEN) == 154820
    flags = {t.content: t.special for t in st.SPECIAL_TOKENS}
    # the first 18 are HF-special; the reasoning / tool tags are plain added tokens
    assert all(t.special for t in st.SPECIAL_TOKENS[:18])
    assert not any(t.special for t in st.SPECIAL_TOKENS[18:])
    assert flags["<|user|>"] and not flags["<think>"] and not flags["<tool_call>"]


def test_no_tag_is_a_substring_of_another():
    # the streaming parser relies on this for split-point invariance
    tags = list(st.SPECIAL_TOKEN_STRINGS) + list(TERMINATORS)
    for a in tags:
        for b in tags:
            if a != b:
                assert a not in b, (a, b)
