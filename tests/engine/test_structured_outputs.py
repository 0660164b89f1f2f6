"""Structured outputs in the engine: ``SamplingParams(structured_outputs=StructuredOutputsParams(...))`` on
``LLM.generate`` and ``--json-schema`` / ``--json-object`` on ``glm5 generate``, on a random-init model whose
vocabulary is the test tokenizer's (its unconstrained text is noise, so every valid document is the grammar's)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from glm5.cli import main
from glm5.engine import LLM, SamplingParams, StructuredOutputsParams
from glm5.tokenizer import special_tokens as st

POINT = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "maxLength": 6},
        "x": {"type": "integer", "minimum": -5, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["label", "x"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(text_model):
    model, tok = text_model
    return LLM(model, tokenizer=tok, max_model_len=256)


def test_json_schema_output_is_valid_for_every_sample(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=48,
                            structured_outputs=StructuredOutputsParams(json=POINT))
    out = llm.generate(["Give me a point:"], params)[0]
    for c in out.outputs:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), POINT)
    assert params.logits_processors is None  # the caller's params are not modified
    # a second request with the same schema reuses the compiled grammar
    llm.generate(["Another:"], SamplingParams(temperature=0, max_tokens=48,
                                              structured_outputs=StructuredOutputsParams(json=json.dumps(POINT))))
    assert len(llm.engine._grammars._grammars) == 1


def test_json_object_with_a_tight_budget_still_closes(llm):
    for seed in range(3):
        out = llm.generate("{", SamplingParams(temperature=1.0, seed=seed, max_tokens=6,
                                               structured_outputs=StructuredOutputsParams(json_object=True)))[0]
        c = out.outputs[0]
        assert isinstance(json.loads(c.text), dict) and len(c.token_ids) <= 6 and c.finish_reason == "stop"


def test_reasoning_comes_first_when_the_prompt_opens_think(llm):
    tok = llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "a point?"}], add_generation_prompt=True,
                                     enable_thinking=True)
    assert prompt.endswith(st.THINK_START)
    out = llm.generate(prompt, SamplingParams(temperature=1.0, seed=1, max_tokens=60, skip_special_tokens=False,
                                              structured_outputs=StructuredOutputsParams(json=POINT)))[0]
    text = out.outputs[0].text
    assert st.THINK_END in text, text  # the grammar ends reasoning in time to fit the answer
    jsonschema.validate(json.loads(text.split(st.THINK_END, 1)[1]), POINT)


def test_bad_structured_outputs_are_refused_when_added(llm, text_model):
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={"type": "object"}, json_object=True)
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{oops")
    with pytest.raises(ValueError, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": POINT})
    with pytest.raises(ValueError, match="uniqueItems"):  # a keyword the grammar cannot enforce, named
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(
            json={"type": "array", "uniqueItems": True})))
    with pytest.raises(ValueError, match="too small"):
        llm.generate("x", SamplingParams(max_tokens=3, structured_outputs=StructuredOutputsParams(json=POINT)))
    assert not llm.engine.has_unfinished_requests()
    no_tok = LLM(text_model[0], max_model_len=64)
    with pytest.raises(ValueError, match="tokenizer"):
        no_tok.generate([[1, 2, 3]], SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)))


def test_cli_generate_json_schema(nano_dir, tmp_path, capsys):
    schema = tmp_path / "point.json"
    schema.write_text(json.dumps(POINT))
    assert main(["generate", "--model", str(nano_dir), "--prompt", "A point:", "--max-tokens", "40",
                 "--temperature", "1", "--seed", "2", "--json-schema", str(schema)]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), POINT)
    assert main(["generate", "--model", str(nano_dir), "--prompt", "An object:", "--max-tokens", "20",
                 "--json-object"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)
    # bad schemas get one line, not a traceback
    assert main(["generate", "--model", str(nano_dir), "--prompt", "x", "--json-schema",
                 '{"type": "string", "format": "uri"}']) == 2
    assert "format" in capsys.readouterr().err
    assert main(["generate", "--model", str(nano_dir), "--prompt", "x", "--json-schema",
                 str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_choice_output_is_one_of_the_strings(llm, nano_dir, capsys):
    labels = ["positive", "negative", "neutral", "négatif 🙂", "pos"]  # "pos" is a prefix of another choice
    params = SamplingParams(n=8, temperature=1.5, seed=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(choice=labels))
    outs = llm.generate(["Sentiment of 'great movie':"], params, use_tqdm=False)[0].outputs
    assert all(c.text in labels and c.finish_reason == "stop" for c in outs), [c.text for c in outs]
    assert len({c.text for c in outs}) > 1  # sampled among them, not one forced string
    with pytest.raises(ValueError, match="too small"):  # "pos" needs 3 bytes at worst (+ EOS)
        llm.generate("x", SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(choice=["pos"])))
    for bad in ([], "yes", ["yes", ""], ["yes", 3]):
        with pytest.raises(ValueError, match="choice"):
            StructuredOutputsParams(choice=bad)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(choice=["a"], json_object=True)
    assert main(["generate", "--model", str(nano_dir), "--prompt", "Yes or no?", "--temperature", "1", "--seed", "4",
                 "--choice", "yes", "--choice", "no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")


def test_regex_output_fully_matches(llm, nano_dir, capsys):
    pattern = r"(\d{1,3}\.){3}\d{1,3}|[a-z]+@[a-z]+\.(com|org)"
    params = SamplingParams(n=6, temperature=1.5, seed=0, max_tokens=24,
                            structured_outputs=StructuredOutputsParams(regex=pattern))
    outs = llm.generate(["An address:"], params, use_tqdm=False)[0].outputs
    assert all(re.fullmatch(pattern, c.text, re.ASCII) and c.finish_reason == "stop" for c in outs), \
        [c.text for c in outs]
    assert len({c.text for c in outs}) > 1
    with pytest.raises(ValueError, match="lookaround"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(?=b)")))
    with pytest.raises(ValueError, match="too small"):  # the shortest match, 7 bytes, then EOS
        llm.generate("x", SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex=pattern)))
    with pytest.raises(ValueError, match="string"):
        StructuredOutputsParams(regex=3)
    assert not llm.engine.has_unfinished_requests()
    assert main(["generate", "--model", str(nano_dir), "--prompt", "Code:", "--temperature", "1", "--seed", "4",
                 "--max-tokens", "12", "--regex", "[A-Z]{2}-[0-9]{3}"]) == 0
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", capsys.readouterr().out.strip())
    assert main(["generate", "--model", str(nano_dir), "--prompt", "x", "--regex", "(a"]) == 2
    assert "missing ')'" in capsys.readouterr().err


def test_gbnf_grammar_output_is_a_sentence(llm, nano_dir, tmp_path, capsys):
    from glm5.structured.gbnf import GbnfAutomaton

    grammar = 'root ::= "[" item ("," item){0,3} "]"\nitem ::= [a-z]{1,4} | "\\"" [0-9]+ "\\""\n'
    auto = GbnfAutomaton(grammar)

    def accepted(text):
        s = auto.start()
        for b in text.encode():
            s = auto.step(s, b)
            if s is None:
                return False
        return auto.complete(s)

    params = SamplingParams(n=4, temperature=1.5, seed=1, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(grammar=grammar))
    outs = llm.generate(["A list:"], params, use_tqdm=False)[0].outputs
    assert all(accepted(c.text) and c.finish_reason == "stop" for c in outs), [c.text for c in outs]
    with pytest.raises(ValueError, match="undefined"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(grammar="root ::= item")))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(grammar=grammar, regex="a")
    path = tmp_path / "list.gbnf"
    path.write_text(grammar)
    assert main(["generate", "--model", str(nano_dir), "--prompt", "List:", "--temperature", "1", "--seed", "4",
                 "--max-tokens", "30", "--grammar", str(path)]) == 0
    assert accepted(capsys.readouterr().out.strip("\n"))


CALLS = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<fn="], "at_least_one": True,
                                             "tags": [{"type": "tag", "begin": "<fn=point>", "end": "</fn>",
                                                       "content": {"type": "json_schema", "json_schema": POINT}}]}}


def checked_calls(text: str) -> int:
    """How many ``<fn=point>{POINT}</fn>`` calls ``text`` holds, each checked (a body's strings may hold "<fn=")."""
    calls, at = 0, text.find("<fn=")
    while at >= 0:
        assert text.startswith("<fn=point>", at), text
        body, end = json.JSONDecoder().raw_decode(text, at + len("<fn=point>"))
        jsonschema.validate(body, POINT)
        assert text.startswith("</fn>", end), text
        calls, at = calls + 1, text.find("<fn=", end + len("</fn>"))
    return calls


def test_structural_tag_output_has_valid_calls(llm, nano_dir, tmp_path, capsys):
    """xgrammar's ``format`` form with ``at_least_one``: the output starts with a call whose body the schema
    accepts, then free text in which any further call is checked too; vLLM's legacy form through the CLI."""
    params = SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(structural_tag=json.dumps(CALLS)))
    for c in llm.generate(["Call it:"], params, use_tqdm=False)[0].outputs:
        assert c.text.startswith("<fn=point>") and checked_calls(c.text) >= 1, c.text
    with pytest.raises(ValueError, match="does not start with any trigger"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(structural_tag={
            "triggers": ["<fn="], "structures": [{"begin": "<call>", "schema": POINT, "end": "</call>"}]})))
    with pytest.raises(ValueError, match="structural_tag must be a JSON object"):
        StructuredOutputsParams(structural_tag="[1]")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(structural_tag=CALLS, regex="a")
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"triggers": ["<fn="], "structures": [
        {"begin": "<fn=point>", "schema": POINT, "end": "</fn>"}]}))
    assert main(["generate", "--model", str(nano_dir), "--prompt", "x", "--temperature", "1", "--seed", "1",
                 "--max-tokens", "30", "--structural-tag", str(path)]) == 0
    checked_calls(capsys.readouterr().out)
    assert main(["generate", "--model", str(nano_dir), "--prompt", "x", "--structural-tag",
                 '{"format": {"type": "any_text", "max_chars": 3}}']) == 2
    assert "max_chars" in capsys.readouterr().err


def test_min_p_keeps_tokens_near_the_best_valid_one(llm):
    """min_p is applied after the grammar (as in vLLM, and as the server orders them): applied before, it could keep
    only tokens the grammar forbids, and this request failed with 'constraints exclude every token'."""
    so = StructuredOutputsParams(regex=r"\d{3,9}")
    for temperature in (0.0, 1.0):
        out = llm.generate(["The quick", "Hello world"], SamplingParams(temperature=temperature, seed=0, max_tokens=12,
                                                                        min_p=0.2, structured_outputs=so),
                           use_tqdm=False)
        for o in out:
            c = o.outputs[0]
            assert c.finish_reason == "stop" and re.fullmatch(r"\d{3,9}", c.text), (c.text, c.finish_reason)


@pytest.mark.parametrize("kind", ["json", "regex", "grammar", "structural_tag"])
def test_structured_outputs_with_mtp_drafts(text_model, kind):
    """Verified MTP drafts go through the grammar like sampled tokens: a draft the grammar forbids is rejected, so
    greedy output is the same with and without speculation and every sample is valid."""
    model, tok = text_model
    so = {"json": StructuredOutputsParams(json=POINT),
          "regex": StructuredOutputsParams(regex=r"[a-z]{2,8}( [a-z]{2,8}){1,3}\."),
          "grammar": StructuredOutputsParams(grammar='root ::= "(" root ")" | [0-9]{1,4}'),
          "structural_tag": StructuredOutputsParams(structural_tag=CALLS)}[kind]
    plain = LLM(model, tokenizer=tok, max_model_len=256)
    spec = LLM(model, tokenizer=tok, max_model_len=256, num_speculative_tokens=3)
    greedy = SamplingParams(temperature=0, max_tokens=40, structured_outputs=so)
    prompts = ["A point:", "Another one:"]
    a = [o.outputs[0].text for o in plain.generate(prompts, greedy, use_tqdm=False)]
    b = [o.outputs[0].text for o in spec.generate(prompts, greedy, use_tqdm=False)]
    assert a == b
    sampled = spec.generate(prompts, SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=40, structured_outputs=so),
                            use_tqdm=False)
    texts = [c.text for o in sampled for c in o.outputs] + a
    if kind == "json":
        for t in texts:
            jsonschema.validate(json.loads(t), POINT)
    elif kind == "structural_tag":
        assert all(t.startswith("<fn=point>") and checked_calls(t) for t in texts), texts
    elif kind == "regex":
        assert all(re.fullmatch(so.regex, t) for t in texts), texts
    else:
        assert all(re.fullmatch(r"(\()*[0-9]{1,4}(\))*", t) and t.count("(") == t.count(")") for t in texts), texts
    assert spec.engine.stats.get("spec_draft_tokens", 0) > 0


def test_penalties_and_bans_with_mtp_drafts_match_plain_decoding(text_model):
    """Penalties, logit_bias and allowed_token_ids see each verified draft as if it had been sampled: greedy tokens
    are identical with and without speculation."""
    model, tok = text_model
    plain = LLM(model, tokenizer=tok, max_model_len=256)
    spec = LLM(model, tokenizer=tok, max_model_len=256, num_speculative_tokens=3)
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, repetition_penalty=1.5,
                             presence_penalty=0.4, frequency_penalty=0.3),
              SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logit_bias={i: -100 for i in range(40, 80)}),
              SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, allowed_token_ids=list(range(100, 160)))]
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    for p in params:
        a = [o.outputs[0].token_ids for o in plain.generate(prompts, p, use_tqdm=False)]
        b = [o.outputs[0].token_ids for o in spec.generate(prompts, p, use_tqdm=False)]
        assert a == b, p
    assert spec.engine.stats["spec_draft_tokens"] > 0


def test_drafts_follow_the_processors(text_model):
    """Drafts are proposed under the request's processors too: with one allowed token the target can only pick it,
    and so can every draft, so all drafts are accepted (unmasked drafts of this random MTP layer almost never are)."""
    model, tok = text_model
    spec = LLM(model, tokenizer=tok, max_model_len=256, num_speculative_tokens=3)
    out = spec.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                    allowed_token_ids=[42]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [42] * 24
    m = spec.spec_metrics()
    assert m["acceptance_rate"] == 1.0 and spec.engine.stats["spec_draft_tokens"] >= 15, m
    grammar = StructuredOutputsParams(grammar='root ::= "ab" root | "ab"')
    out = spec.generate(["x"], SamplingParams(temperature=0.8, seed=2, max_tokens=30, structured_outputs=grammar),
                        use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("(ab)+", out.text), out.text
