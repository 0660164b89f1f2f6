"""Answer extraction after </think>, the abstention-aware reward, verifiable scoring, plugins, task generation."""

import textwrap

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from glm5.rl.rewards import (abstention_reward, as_reward_result, binary_reward, extract_answer, is_abstention,
                             load_reward_fn, score_answer)
from glm5.rl.tasks import (generate_tasks, load_tasks, make_task_set, parse_task_spec, reasoning_gym_available,
                           save_tasks, train_eval_split, unanswerable_questions)

ANS = {"question": "Calculate 3 + 4.", "answer": "7", "answerable": True, "source": "builtin", "task": "arith"}
UNANS = {"question": "What number is Bob thinking of?", "answer": None, "answerable": False, "source": "unanswerable"}


def test_extract_answer_after_think():
    assert extract_answer("3 plus 4 is 7, or maybe 8</think>7<|user|>") == "7"
    assert extract_answer("think </think> wrong </think> 12 <|endoftext|>junk") == "12"  # the last </think>
    assert extract_answer("I am still thinking 7 7 7") is None  # reasoning never closed: no answer
    assert extract_answer("no think tags 5", require_think_end=False) == "no think tags 5"
    assert extract_answer("x</think>The result is \\boxed{42}.") == "42"
    assert extract_answer("x</think>work\nFinal answer: 15") == "15"
    assert extract_answer("x</think><tool_call>calc<arg_key>e</arg_key><arg_value>1</arg_value></tool_call>9") == "9"
    assert extract_answer("x</think>  <|user|>") is None


@pytest.mark.parametrize("text,yes", [("I don't know.", True), ("i dont know", True), ("I do not know", True),
                                      ("I don\u2019t know", True), ("IDK", True), ("It is unknown.", True),
                                      ("I know: 7", False), ("7", False), ("", False), (None, False),
                                      ("Unknowns: x = 2, y = 3", False), ("idk", True), ("Cannot be determined", True)])
def test_is_abstention(text, yes):
    assert is_abstention(text) is yes


def test_abstention_reward_table():
    r = lambda text, task: abstention_reward(text, task)  # noqa: E731
    assert r("...</think>7<|user|>", ANS).reward == 1.0
    assert r("...</think>I don't know.<|user|>", ANS).reward == 0.0
    assert r("...</think>8<|user|>", ANS).reward == -1.0
    assert r("thinking forever", ANS).reward == -1.0  # no answer = wrong
    assert r("...</think>I don't know.<|user|>", UNANS).reward == 1.0
    assert r("...</think>42<|user|>", UNANS).reward == -1.0
    res = r("...</think>8<|user|>", ANS)
    assert res.answered and not res.correct and not res.abstained and res.answer == "8"
    res = r("...</think>I don't know.<|user|>", ANS)
    assert res.abstained and not res.answered
    assert binary_reward("...</think>7", ANS).reward == 1.0 and binary_reward("...</think>I don't know", ANS).reward == 0.0
    assert binary_reward("...</think>I don't know", UNANS).reward == 1.0


def test_numeric_matching():
    assert score_answer("7.0", ANS) == 1.0 and score_answer("7.", ANS) == 1.0 and score_answer("8", ANS) == 0.0
    assert score_answer("1,234", {"answer": "1234"}) == 1.0
    assert score_answer("Paris", {"answer": "paris"}) == 1.0


@pytest.mark.parametrize("answer,gold,correct", [
    ("New  York", "new york", True),  # runs of whitespace are one space
    ("Paris", "Paris\n", True),  # a gold answer read from a file keeps its newline
    ("Paris.", "Paris", True),  # a sentence-final period is not part of the answer
    ("Lyon", "Paris", False),
    ("7.50.", "7.5", True),  # ... nor for numbers
    ("$1,234", "1234", True),  # currency sign and thousands separator
    ("1/3", "0.3333333", True),  # fractions are numbers; 1e-6 relative tolerance
    ("0.3333", "1/3", False),  # 1e-4 off: beyond the tolerance
    ("3/4", "0.75", True),
    ("4/3", "0.75", False),
])
def test_verifier_normalises_format_not_content(answer, gold, correct):
    """Formatting (case, whitespace, trailing period, $ and thousands separators, a fraction vs its decimal within
    the documented 1e-6 tolerance) never changes the verdict; a different value always does."""
    assert score_answer(answer, {"answer": gold}) == (1.0 if correct else 0.0)
    assert abstention_reward(f"r</think>{answer}", {"answer": gold}).reward == (1.0 if correct else -1.0)


def test_the_last_boxed_or_answer_line_is_the_answer():
    """A response that corrects itself is graded on its final answer: the last \\boxed{}, or the last "Answer:"
    line."""
    assert extract_answer("r</think>First \\boxed{3}; no, recheck: \\boxed{4}") == "4"
    assert extract_answer("r</think>Answer: 3\nWait, 3 is wrong.\nFinal answer: 4") == "4"
    assert abstention_reward("r</think>Answer: 8\nActually:\nAnswer: 7", ANS).reward == 1.0
    assert abstention_reward("r</think>Answer: 7\nActually:\nAnswer: 8", ANS).reward == -1.0


def test_a_task_without_the_answerable_key_is_answerable():
    """Tasks from other sources (a plain JSONL of question/answer) carry no "answerable" flag: they are graded as
    answerable questions (+1 / 0 / −1), not as unanswerable ones (where any answer would be −1)."""
    task = {"question": "Calculate 3 + 4.", "answer": "7"}
    assert [abstention_reward(f"r</think>{a}", task).reward for a in ("7", "I don't know", "8")] == [1.0, 0.0, -1.0]
    assert [binary_reward(f"r</think>{a}", task).reward for a in ("7", "I don't know", "8")] == [1.0, 0.0, 0.0]
    assert abstention_reward("r</think>7", task).correct


def test_any_answer_to_an_unanswerable_question_is_wrong_even_if_it_matches_a_stored_answer():
    """An unanswerable task may still carry an "answer" field (e.g. the value a trap question suggests): answering
    it is wrong under both reward functions; only abstaining is right."""
    trap = dict(UNANS, answer="42")
    res = abstention_reward("r</think>42", trap)
    assert res.reward == -1.0 and not res.correct and res.answered
    assert binary_reward("r</think>42", trap).reward == 0.0
    assert abstention_reward("r</think>I don't know", trap).reward == 1.0


_PIECES = ["a", "7", " ", "\n", "<", "/", ":", "=", "{", "}", "\\boxed{9}", "Answer: 5", "</think>", "<|user|>",
           "<|endoftext|>", "<|observation|>", "<tool_call>", "</tool_call>"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)
_ANSWER = st.text(alphabet="abxyz0123456789 .,-", max_size=12)  # no tags, "answer:" lines or \\boxed
_TERMINATOR = st.sampled_from(["", "<|user|>", "<|endoftext|>", "<|observation|>", "<|assistant|>", "<|system|>"])
_AFTER = st.lists(st.sampled_from([p for p in _PIECES if p != "</think>"]), max_size=6).map("".join)  # next turn


@settings(max_examples=200, deadline=None, derandomize=True)
@given(reasoning=_TEXT, answer=_ANSWER, terminator=_TERMINATOR, after=_AFTER)
@example(reasoning="x", answer="", terminator="<|user|>", after="7")  # nothing between </think> and the EOS
@example(reasoning="7</think>8", answer="9", terminator="<|user|>", after="3<|endoftext|>4")
def test_the_answer_is_exactly_the_text_after_the_last_think_end_up_to_the_first_terminator(reasoning, answer,
                                                                                            terminator, after):
    """Whatever the reasoning contains (other </think> tags, boxed answers, role tokens, tool calls), the graded
    answer is what follows the last </think>, cut at the first role / EOS token, stripped; empty means no answer."""
    text = reasoning + "</think>" + answer + terminator + (after if terminator else "")
    assert extract_answer(text) == (answer.strip() or None)
    no_close = reasoning.replace("</think>", "")
    assert extract_answer(no_close) is None  # reasoning never closed: no answer at all
    assert extract_answer(no_close + "</think>" + answer) == (answer.strip() or None)


@pytest.mark.skipif(not reasoning_gym_available(), reason="reasoning-gym not installed")
def test_reasoning_gym_scoring():
    t = generate_tasks("gsm_symbolic", 1, seed=3)[0]
    assert t["source"] == "reasoning_gym" and t["answerable"]
    assert score_answer(t["answer"], t) == 1.0
    wrong = str(int(t["answer"]) + 1)
    assert 0.0 <= score_answer(wrong, t) < 1.0  # gsm_symbolic gives 0.01: not correct
    assert abstention_reward(f"x</think>{wrong}", t).reward == -1.0
    c = generate_tasks("countdown:min_numbers=3,max_numbers=3", 1, seed=0)[0]
    assert score_answer(c["answer"], c) == 1.0  # any expression reaching the target scores


def test_reward_plugin_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length_reward(response, task):
            return len(response) / 100.0
        def dict_reward(response, task):
            return {"reward": 0.5, "correct": True}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("my_rewards:length_reward")
    assert fn("abcd", {}) == 0.04
    assert load_reward_fn("my_rewards.dict_reward")("x", {})["reward"] == 0.5
    assert load_reward_fn(str(tmp_path / "my_rewards.py") + ":length_reward")("ab", {}) == 0.02
    res = as_reward_result(load_reward_fn("my_rewards:dict_reward")("x", ANS), "x", ANS)
    assert res.reward == 0.5 and res.correct is True
    assert load_reward_fn("abstention") is abstention_reward
    with pytest.raises(ValueError, match="no module named 'no_such_module_xyz'"):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError):
        load_reward_fn("notbuiltin")


def test_bad_reward_specs_are_one_value_error_each(tmp_path, monkeypatch):
    # `glm5 rl` reports a ValueError in one line; before, these were ImportError / AttributeError /
    # FileNotFoundError tracebacks from inside the rollout process
    (tmp_path / "rw_ok.py").write_text("def f(response, task):\n    return 1.0\nnot_callable = 3\n")
    (tmp_path / "rw_broken.py").write_text("import no_such_dependency_xyz\ndef f(response, task):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, msg in [("rw_ok:missing", "has no function 'missing'"), ("rw_ok:not_callable", "no function"),
                      (str(tmp_path / "nofile.py") + ":f", "no such file"),
                      ("rw_broken:f", "importing 'rw_broken' failed: ModuleNotFoundError"),
                      ("rw_ok:", "expected 'module:function'")]:
        with pytest.raises(ValueError, match=msg):
            load_reward_fn(spec)
    assert load_reward_fn("rw_ok:f")("x", {}) == 1.0


@pytest.mark.parametrize("value", [None, "yes", "1.0", float("nan"), float("inf"), [1.0], {"reward": None},
                                   {"reward": float("nan")}])
def test_a_reward_that_is_not_a_finite_number_is_refused(value):
    # the rollout marks such a sample FAILED (it was trained on: NaN rewards made NaN losses, strings crashed
    # nothing but were silently dropped)
    with pytest.raises((TypeError, ValueError)):
        as_reward_result(value, "x</think>7", ANS)
    assert as_reward_result(True, "x</think>7", ANS).reward == 1.0  # numbers of any kind are fine
    assert as_reward_result({"reward": 2}, "x</think>7", ANS).reward == 2.0


def test_task_generation(tmp_path):
    assert parse_task_spec("basic_arithmetic:max_terms=2,max_digits=1,operators=+|-") == (
        "basic_arithmetic", {"max_terms": 2, "max_digits": 1, "operators": ("+", "-")})
    a = generate_tasks("arith", 20, seed=1)
    assert a == generate_tasks("arith", 20, seed=1)  # deterministic
    assert all(t["answerable"] and str(eval(t["question"][10:-1])) == t["answer"] for t in a)
    un = unanswerable_questions(30, seed=2)
    assert len(un) == 30 and len({t["question"] for t in un}) == 30
    assert all(not t["answerable"] and t["answer"] is None for t in un)
    mix = make_task_set(["arith"], 40, seed=0, unanswerable_frac=0.25)
    assert sum(not t["answerable"] for t in mix) == 10
    tr, ev = train_eval_split(["arith"], 40, 20, seed=0, unanswerable_frac=0.25)
    assert len(ev) == 20 and not ({t["question"] for t in tr} & {t["question"] for t in ev})
    save_tasks(mix, tmp_path / "t.jsonl")
    assert load_tasks(tmp_path / "t.jsonl") == mix
    if reasoning_gym_available():
        rg = make_task_set(["basic_arithmetic:max_terms=2,max_digits=1", "chain_sum:max_terms=2,max_digits=1"], 10,
                           seed=0, unanswerable_frac=0.2)
        assert {t["task"] for t in rg} >= {"basic_arithmetic", "chain_sum"}
        assert all(score_answer(t["answer"], t) == 1.0 for t in rg if t["answerable"])


@pytest.mark.skipif(not reasoning_gym_available(), reason="needs reasoning-gym")
def test_arithmetic_tasks_whose_answer_contradicts_the_question_are_dropped():
    from fractions import Fraction

    spec = "basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=1,allow_parentheses=false"
    tasks = generate_tasks(spec, 150, seed=3)  # "/" included: the generator's quotients are mostly inconsistent
    assert len(tasks) == 150
    for t in tasks:
        a, op, b = t["metadata"]["expression"].split()
        a, b = Fraction(int(a)), Fraction(int(b))
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op] == Fraction(t["answer"])


def test_held_out_set_keeps_the_unanswerable_share_when_the_task_space_is_small():
    # 'arith' with max_value=2 has 27 distinct questions: 20 training tasks leave few unseen answerable ones
    with pytest.warns(UserWarning, match="answerable questions are not in the training set"):
        tr, ev = train_eval_split(["arith:max_value=2"], 20, 40, seed=0, unanswerable_frac=0.25)
    seen = {t["question"] for t in tr}
    assert ev and not any(t["question"] in seen for t in ev)
    n_un = sum(not t["answerable"] for t in ev)
    assert abs(n_un / len(ev) - 0.25) < 0.1 and len(ev) < 40
    _, ev_big = train_eval_split(["arith"], 40, 20, seed=0, unanswerable_frac=0.25)
    assert len(ev_big) == 20 and sum(not t["answerable"] for t in ev_big) == 5
