"""Rewards: answer extraction after ``</think>``, verifiable scoring, the abstention-aware reward, plugins.

The policy answers in GLM-5's format: reasoning, ``</think>``, the final answer, then the end-of-turn
token. The answer is the text after the *last* ``</think>`` (cut at any role/EOS token, tool calls
removed); an output that never closes its reasoning has no answer. ``\\boxed{..}`` or a trailing
``Answer: ..`` line are unwrapped when present.

Scoring: a reasoning-gym task is scored by the generator's own ``score_answer`` (exact credit = 1.0 counts
as correct; gsm_symbolic gives 0.01 for a wrong number, which is *not* correct); other tasks compare
numbers (tolerance 1e-6, ``1,234`` = ``1234``, ``4.0`` = ``4``) or case-folded strings.

Reward functions (selectable by name or import path, see :func:`load_reward_fn`):

* ``abstention`` (default): answerable question: correct +1, "I don't know" 0, wrong or no answer −1;
  unanswerable question: "I don't know" +1, any answer −1. Expected reward of answering with confidence p
  is 2p − 1, so abstaining (0) is better exactly when p < 1/2: it trains the model to say "I don't know"
  rather than guess, the behaviour GLM-5's report highlights.
* ``binary``: 1 for a correct answer (for an unanswerable question: for abstaining), else 0.

A reward function is ``fn(response_text: str, task: dict) -> RewardResult | float | dict``; a plugin module is
named ``"package.module:function"`` (or ``"package.module.function"``, or ``"path/to/file.py:function"``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["RewardResult", "extract_answer", "is_abstention", "score_answer", "abstention_reward", "binary_reward",
           "load_reward_fn", "as_reward_result", "REWARD_FUNCTIONS", "IDK"]

IDK = "I don't know"
THINK_END = "</think>"
_TERMINATORS = ("<|user|>", "<|observation|>", "<|endoftext|>", "<|assistant|>", "<|system|>")
_TOOL_CALL_RE = re.compile(r"<tool_call>.*?(</tool_call>|$)", re.S)
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_ANSWER_LINE_RE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:=]\s*(.+)", re.I)
_ABSTAIN_RE = re.compile(
    r"^(?:i\s*(?:do\s*not|don'?t|dont)\s*know|idk|i\s*(?:cannot|can'?t)\s*(?:know|tell|answer)(?:\s*that)?"
    r"|(?:it\s*(?:is|'s)\s*)?(?:unknown|unknowable|not\s*enough\s*information|cannot\s*be\s*determined))\b")


@dataclass
class RewardResult:
    reward: float
    correct: bool = False
    abstained: bool = False
    answered: bool = False  # gave an answer that is not an abstention
    answer: str | None = None
    score: float = 0.0  # raw verifier score in [0, 1]

    def to_dict(self) -> dict:
        return asdict(self)


def extract_answer(text: str, require_think_end: bool = True) -> str | None:
    """The final answer: text after the last ``</think>``, cut at role/EOS tokens, tool calls removed.

    ``require_think_end=False`` also accepts outputs without ``</think>`` (whole text = answer)."""
    if THINK_END in text:
        tail = text.rsplit(THINK_END, 1)[1]
    elif require_think_end:
        return None
    else:
        tail = text
    cut = len(tail)
    for t in _TERMINATORS:
        i = tail.find(t)
        if 0 <= i < cut:
            cut = i
    tail = _TOOL_CALL_RE.sub("", tail[:cut]).strip()
    boxed = _BOXED_RE.findall(tail)
    if boxed:
        tail = boxed[-1].strip()
    else:
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        for ln in reversed(lines):
            mm = _ANSWER_LINE_RE.search(ln)
            if mm:
                tail = mm.group(1).strip()
                break
    return tail or None


def _norm_text(s: str) -> str:
    s = s.replace("\u2019", "'").replace("\u2018", "'").strip().lower()
    return re.sub(r"\s+", " ", s)


def is_abstention(answer: str | None) -> bool:
    """"I don't know" and close variants (case, apostrophes, trailing punctuation)."""
    if not answer:
        return False
    return bool(_ABSTAIN_RE.match(_norm_text(answer)))


_NUM_RE = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?([eE][-+]?\d+)?$")


def _to_number(s: str) -> float | None:
    s = s.strip().rstrip(".").strip().replace("$", "")
    if not s or not _NUM_RE.match(s) or not any(c.isdigit() for c in s):
        if re.fullmatch(r"[-+]?\d+/\d+", s):
            a, b = s.split("/")
            return float(a) / float(b) if float(b) else None
        return None
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


@functools.lru_cache(maxsize=None)
def _rg_scorer(name: str):
    try:
        import reasoning_gym
    except ImportError:
        return None
    try:
        return reasoning_gym.get_score_answer_fn(name)
    except Exception:
        return None


def score_answer(answer: str | None, task: dict) -> float:
    """Verifier score in [0, 1] of ``answer`` for ``task`` (1.0 = correct)."""
    if answer is None or task.get("answer") is None:
        return 0.0
    if task.get("source") == "reasoning_gym":
        fn = _rg_scorer(task.get("task", ""))
        if fn is not None:
            entry = {"question": task.get("question", ""), "answer": task["answer"], "metadata": task.get("metadata", {})}
            try:
                return float(fn(answer, entry))
            except Exception:
                return 0.0
    gold = str(task["answer"])
    a, g = _to_number(answer), _to_number(gold)
    if a is not None and g is not None:
        return 1.0 if math.isclose(a, g, rel_tol=1e-6, abs_tol=1e-6) else 0.0
    return 1.0 if _norm_text(answer).rstrip(".") == _norm_text(gold).rstrip(".") else 0.0


def _judge(response: str, task: dict) -> RewardResult:
    ans = extract_answer(response)
    abstained = is_abstention(ans)
    answerable = task.get("answerable", True)
    if abstained:
        correct, score = (not answerable), (0.0 if answerable else 1.0)
    elif not answerable or ans is None:
        correct, score = False, 0.0
    else:
        score = score_answer(ans, task)
        correct = score >= 1.0 - 1e-9
    return RewardResult(reward=0.0, correct=correct, abstained=abstained, answered=ans is not None and not abstained,
                        answer=ans, score=score)


def abstention_reward(response: str, task: dict, right: float = 1.0, abstain: float = 0.0,
                      wrong: float = -1.0) -> RewardResult:
    """+1 right, 0 "I don't know", −1 wrong (no answer counts as wrong). For an unanswerable question
    "I don't know" is the right answer."""
    r = _judge(response, task)
    if task.get("answerable", True):
        r.reward = right if r.correct else (abstain if r.abstained else wrong)
    else:
        r.reward = right if r.abstained else wrong
    return r


def binary_reward(response: str, task: dict) -> RewardResult:
    """1 for a correct answer (abstaining on an unanswerable question is correct), else 0."""
    r = _judge(response, task)
    r.reward = 1.0 if r.correct else 0.0
    return r


REWARD_FUNCTIONS: dict[str, Callable] = {"abstention": abstention_reward, "binary": binary_reward}


def load_reward_fn(spec: str | Callable) -> Callable:
    """A reward function from a built-in name, ``module:function``, ``module.function`` or ``file.py:function``.

    Every way the spec can fail (unknown name, missing module or file, a module that raises on import, no such
    function) is a ``ValueError`` naming the spec, so ``glm5 rl`` reports it in one line before starting."""
    if callable(spec):
        return spec
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    if ":" in spec:
        mod_name, fn_name = spec.rsplit(":", 1)
    elif "." in spec:
        mod_name, fn_name = spec.rsplit(".", 1)
    else:
        raise ValueError(f"reward {spec!r}: not a built-in ({', '.join(REWARD_FUNCTIONS)}) nor 'module:function'")
    if not mod_name or not fn_name:
        raise ValueError(f"reward {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise ValueError(f"reward {spec!r}: no such file {str(path)!r}")
            s = importlib.util.spec_from_file_location(f"glm5_rl_reward_{abs(hash(str(path)))}", path)
            if s is None or s.loader is None:
                raise ValueError(f"reward {spec!r}: cannot load a Python module from {str(path)!r}")
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
    except ValueError:
        raise
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):  # the module itself is missing
            raise ValueError(f"reward {spec!r}: no module named {mod_name!r} (is it on PYTHONPATH?)") from e
        raise ValueError(f"reward {spec!r}: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # the plugin module itself failed (syntax error, failing import, ...)
        raise ValueError(f"reward {spec!r}: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {mod_name} has no function {fn_name!r}")
    return fn


def _as_reward(value) -> float:
    """A plugin's reward as a finite float; anything else (None, a string, NaN, ...) is an error, so that a broken
    reward function fails its samples loudly instead of training on garbage."""
    not_a_number = TypeError(f"the reward function returned {value!r} ({type(value).__name__}); expected a number, "
                             "a dict with a 'reward' number, or a RewardResult")
    if value is None or isinstance(value, (str, bytes)):
        raise not_a_number
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise not_a_number from None
    if not math.isfinite(r):
        raise ValueError(f"the reward function returned a non-finite reward ({r})")
    return r


def as_reward_result(value, response: str, task: dict) -> RewardResult:
    """Normalise a plugin's return value (RewardResult, number or dict with a ``reward`` key). A value that is not a
    finite number raises (``TypeError`` / ``ValueError``): the rollout marks the sample failed."""
    if isinstance(value, RewardResult):
        value.reward = _as_reward(value.reward)
        return value
    if isinstance(value, dict):
        d = dict(value)
        if "reward" not in d:
            raise ValueError("a reward dict needs a 'reward' key")
        reward = _as_reward(d["reward"])
        base = _judge(response, task)
        for k, v in d.items():
            if hasattr(base, k):
                setattr(base, k, v)
        base.reward = reward
        return base
    reward = _as_reward(value)
    base = _judge(response, task)
    base.reward = reward
    return base
