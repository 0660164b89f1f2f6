"""Verifiable tasks generated offline, plus unanswerable questions for the abstention reward.

A task is a JSON-able dict::

    {"id": "basic_arithmetic-7-12", "source": "reasoning_gym" | "builtin" | "unanswerable",
     "task": "basic_arithmetic", "question": "...", "answer": "-4" | None, "answerable": True,
     "metadata": {...}}

Sources:

* reasoning-gym generators (``pip install reasoning-gym``; offline): any registered name, with config
  overrides, e.g. ``"basic_arithmetic:min_terms=2,max_terms=2,max_digits=1"``, ``"gsm_symbolic"``,
  ``"countdown:min_numbers=3,max_numbers=3"``. Scored later by the generator's own ``score_answer``.
* ``arith``: a dependency-free built-in (``a op b`` with small integers), used when reasoning-gym is absent.
* unanswerable questions (:func:`unanswerable_questions`): arithmetic with an unspecified quantity, word
  problems missing a number, and questions about unknowable private facts. Their right answer is
  "I don't know" (``answerable: False``, ``answer: None``).

:func:`make_task_set` mixes them with a given unanswerable fraction; train and held-out sets come from
different seeds and are de-duplicated against each other (:func:`train_eval_split`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from glm5.data.corpus import read_jsonl

__all__ = ["parse_task_spec", "generate_tasks", "unanswerable_questions", "make_task_set", "train_eval_split",
           "build_messages", "save_tasks", "load_tasks", "reasoning_gym_available"]

DEFAULT_SYSTEM = None  # GLM-5 works without a system prompt; the SFT data decides the format


def reasoning_gym_available() -> bool:
    try:
        import reasoning_gym  # noqa: F401
        return True
    except ImportError:
        return False


def _parse_value(v: str):
    v = v.strip()
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if "|" in v:
        return tuple(x for x in v.split("|") if x)
    return v


def parse_task_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` (``a|b`` gives a tuple) -> (name, config overrides)."""
    name, _, rest = spec.partition(":")
    cfg = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"task spec {spec!r}: expected key=value, got {item!r}")
        cfg[k.strip()] = _parse_value(v)
    return name.strip(), cfg


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _builtin_arith(n: int, seed: int, max_value: int = 9, ops: str = "+-*") -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, op = rng.randint(0, max_value), rng.randint(0, max_value), rng.choice(ops)
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append({"id": f"arith-{seed}-{i}", "source": "builtin", "task": "arith",
                    "question": f"Calculate {a} {op} {b}.", "answer": str(val), "answerable": True,
                    "metadata": {"a": a, "b": b, "op": op}})
    return out


def generate_tasks(spec: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` answerable tasks from one generator spec (see module docstring)."""
    name, cfg = parse_task_spec(spec)
    if name == "arith":
        return _builtin_arith(n, seed, **cfg)
    if not reasoning_gym_available():
        raise ImportError(f"task {name!r} needs reasoning-gym (pip install reasoning-gym), or use 'arith'")
    import reasoning_gym as rg

    ds = rg.create_dataset(name, size=2 * n + 16, seed=seed, **cfg)
    out, dropped = [], 0
    for i in range(len(ds)):
        if len(out) == n:
            break
        e = ds[i]
        if not _answer_matches_expression(name, e):
            dropped += 1
            continue
        out.append({"id": f"{name}-{seed}-{i}", "source": "reasoning_gym", "task": name, "question": e["question"],
                    "answer": str(e["answer"]), "answerable": True, "metadata": _jsonable(e.get("metadata", {}))})
    if len(out) < n:
        raise ValueError(f"task spec {spec!r}: only {len(out)} of {n} generated tasks have answers consistent with "
                         f"their questions ({dropped} dropped)")
    return out


def _answer_matches_expression(name: str, e: dict) -> bool:
    """Arithmetic generators carry the expression: check the stated answer against it, so that a generator bug
    cannot hand out wrong rewards. (reasoning-gym 0.1.25's basic_arithmetic with ``/`` pairs most quotient
    questions with unrelated answers, e.g. "Calculate 7 / 0." -> 63.) Other generators are trusted."""
    expr = (e.get("metadata") or {}).get("expression")
    if name not in ("basic_arithmetic", "chain_sum") or not expr:
        return True
    from glm5.data.sft import worked_arithmetic

    try:
        _, value = worked_arithmetic(expr)
    except (ValueError, ZeroDivisionError, SyntaxError):
        return False
    return value == str(e["answer"]).strip()


_NAMES = ["Alice", "Bob", "Carla", "Deng", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Mei",
          "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
_ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "shells", "cards", "stamps"]
_PLACES = ["Zorbania", "Quellmoor", "Vantori", "Elsker Bay", "Draumholt", "Pellucid Falls", "Karrow", "Ostrivia"]
_SYMBOLS = ["x", "y", "z", "k", "n", "q", "the unknown number", "a secret number"]


def unanswerable_questions(n: int, seed: int = 0) -> list[dict]:
    """``n`` questions that cannot be answered from what they say (right answer: "I don't know")."""
    rng = random.Random(seed)

    def missing_var():
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        s = rng.choice(_SYMBOLS)
        return rng.choice([f"Calculate {a} + {s}.", f"Calculate {a} * {s} - {b}.", f"What is {s} - {a}?",
                           f"State the final answer to the following arithmetic problem: {a} + {s} ="])

    def missing_count():
        p, q, it = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_ITEMS)
        k = rng.randint(2, 40)
        return rng.choice([
            f"{p} has some {it}. {p} buys {k} more {it}. How many {it} does {p} have now?",
            f"{p} gave {k} {it} to {q}. How many {it} does {q} have now?",
            f"A box holds {it}. {p} takes out {k} {it}. How many {it} are left in the box?",
            f"{p} and {q} together have {k} {it} more than yesterday. How many {it} do they have today?",
        ])

    def private_fact():
        p, pl, it = rng.choice(_NAMES), rng.choice(_PLACES), rng.choice(_ITEMS)
        return rng.choice([
            f"How many {it} did {p} from {pl} count last Tuesday?",
            f"What is the house number of {p}'s grandmother in {pl}?",
            f"What was the exact population of {pl} in the year 1312?",
            f"How many {it} are in {p}'s drawer right now?",
            f"What number is {p} thinking of?",
        ])

    makers = [("missing_variable", missing_var), ("missing_quantity", missing_count), ("private_fact", private_fact)]
    out, seen = [], set()
    tries = 0
    while len(out) < n and tries < 50 * n + 100:
        tries += 1
        kind, fn = rng.choice(makers)
        q = fn()
        if q in seen:
            continue
        seen.add(q)
        out.append({"id": f"unanswerable-{seed}-{len(out)}", "source": "unanswerable", "task": kind, "question": q,
                    "answer": None, "answerable": False, "metadata": {}})
    return out


def make_task_set(specs: Iterable[str], n: int, seed: int = 0, unanswerable_frac: float = 0.0) -> list[dict]:
    """``n`` tasks: ``unanswerable_frac`` of them unanswerable, the rest split evenly over ``specs``; shuffled."""
    specs = list(specs)
    if not specs and unanswerable_frac < 1.0:
        raise ValueError("need at least one task spec")
    n_un = int(round(n * unanswerable_frac))
    n_ans = n - n_un
    tasks = []
    for j, spec in enumerate(specs):
        k = n_ans // len(specs) + (1 if j < n_ans % len(specs) else 0)
        if k:
            tasks += generate_tasks(spec, k, seed=seed * 1000 + j)
    tasks += unanswerable_questions(n_un, seed=seed * 1000 + 999)
    random.Random(seed).shuffle(tasks)
    return tasks


def train_eval_split(specs: Iterable[str], n_train: int, n_eval: int, seed: int = 0,
                     unanswerable_frac: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out sets (different seeds; held-out questions that also occur in train dropped and
    regenerated with further seeds). The held-out set keeps the requested unanswerable share: when a small task
    space runs out of unseen answerable questions, it comes out smaller (with a warning) rather than padded with
    unanswerable ones, which would skew accuracy and abstention figures."""
    import warnings

    specs = list(specs)
    train = make_task_set(specs, n_train, seed=seed, unanswerable_frac=unanswerable_frac)
    seen = {t["question"] for t in train}
    n_un = round(n_eval * unanswerable_frac)
    want = {True: n_eval - n_un, False: n_un}  # answerable -> quota
    got: dict[bool, list[dict]] = {True: [], False: []}
    s = seed + 7919
    for _ in range(20):
        missing = sum(want[k] - len(got[k]) for k in got)
        for t in make_task_set(specs, max(missing, 1) * 2, seed=s, unanswerable_frac=unanswerable_frac):
            k = bool(t["answerable"])
            if t["question"] not in seen and len(got[k]) < want[k]:
                seen.add(t["question"])
                got[k].append(t)
        if all(len(got[k]) >= want[k] for k in got):
            break
        s += 1
    if len(got[True]) < want[True]:
        got[False] = got[False][: round(len(got[True]) * n_un / max(1, want[True]))]
        warnings.warn(f"held-out set: only {len(got[True])} of {want[True]} answerable questions are not in the "
                      f"training set (task space too small); keeping the unanswerable share, the set has "
                      f"{len(got[True]) + len(got[False])} tasks", stacklevel=2)
    held = got[True] + got[False]
    random.Random(seed).shuffle(held)
    return train, held


def build_messages(task: dict, system: str | None = DEFAULT_SYSTEM) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": task["question"]}]


def save_tasks(tasks: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")


def load_tasks(path: str | Path) -> list[dict]:
    """Tasks from a JSONL file, one JSON object a line: ``question`` (the user message) is required, ``answer``
    too unless ``"answerable": false``; the other fields default (``answerable`` true). A malformed line is a
    ``ValueError`` naming the file and line."""
    tasks = []
    for n, t in read_jsonl(path):
        if not isinstance(t, dict):
            raise ValueError(f"{path}:{n}: a task must be a JSON object, got {type(t).__name__}")
        if not isinstance(t.get("question"), str) or not t["question"].strip():
            raise ValueError(f"{path}:{n}: a task needs a non-empty string 'question' (the user message); "
                             f"it has keys {sorted(t)}")
        if t.get("answerable", True) and t.get("answer") is None:
            raise ValueError(f"{path}:{n}: an answerable task needs an 'answer' (or set \"answerable\": false)")
        tasks.append(t)
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks
