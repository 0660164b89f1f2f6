"""Supervised fine-tuning data: conversations → token ids + an assistant-only loss mask.

``render_conversation`` renders with the tokenizer's GLM-5 chat template (``clear_thinking=False``, so
every assistant turn keeps its ``<think>`` reasoning and the rendering of a prefix is a prefix of the
rendering) and marks as trainable exactly what the assistant produces: ``<think>reasoning</think>``, the
content, the ``<tool_call>`` blocks, and the token that ends the turn (the next role token: ``<|user|>``,
or ``<|observation|>`` after tool calls — both are GLM-5 EOS ids). The prompt, system, user and tool
messages and the ``<|assistant|>`` role tag carry no loss. Every cut falls next to an added token, so
encoding the pieces separately gives the same ids as encoding the whole text.

``default_sft_conversations`` generates the offline default SFT set: reasoning-gym tasks (arithmetic,
GSM-style word problems, counting, gcd/lcm, fractions) answered with a worked solution inside
``<think>``, a share of unanswerable questions answered "I don't know.", and a share of calculator
tool-call conversations.

A record may instead be a plain document, ``{"text": "..."}``: it is trained on every token and ends
with EOS, exactly as in pretraining. Mixing some pretraining text into SFT (nanochat's midtraining does
the same) keeps a small model from forgetting its corpus while it learns the chat format.

``build_sft_dataset`` / ``prepare_sft_dataset`` store the result like the pretraining token files
(``{split}.bin``, plus ``{split}.mask.bin`` uint8 and ``{split}.offsets.npy``) with a manifest.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from glm5.data.corpus import read_jsonl, resolve_sources, sources_fingerprint
from glm5.data.tokenize import _write_json_atomic, token_dtype

__all__ = ["render_conversation", "render_record", "check_messages", "default_sft_conversations", "build_sft_dataset", "prepare_sft_dataset",
           "load_sft_split", "normalize_record", "read_conversations", "IDK", "SFT_FORMAT"]

SFT_FORMAT = "glm5-sft-v1"
IDK = "I don't know."
ASSISTANT, USER, OBSERVATION = "<|assistant|>", "<|user|>", "<|observation|>"


# ------------------------------------------------------------------------------------------ rendering
ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(messages) -> list[dict]:
    """The normalised messages of a training conversation; ValueError if they cannot make one (not a list of
    objects, an unknown role, tool-call arguments that are not JSON, no assistant message)."""
    from glm5.tokenizer.chat_template import normalize_messages

    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    msgs = normalize_messages(messages)
    for i, m in enumerate(msgs):
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i}: unsupported role {m.get('role')!r} (use {', '.join(ROLES)})")
    if not any(m.get("role") == "assistant" for m in msgs):
        raise ValueError("a training conversation needs at least one assistant message")
    return msgs


def render_conversation(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None
                        ) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for one conversation; loss_mask[i] = 1 where ids[i] is produced by the assistant."""
    msgs = check_messages(messages)

    def render(ms):
        return tokenizer.apply_chat_template(ms, tools, add_generation_prompt=False, enable_thinking=True,
                                             clear_thinking=False)

    ids: list[int] = []
    mask: list[int] = []

    def add(text: str, trainable: bool):
        t = tokenizer.encode(text) if text else []
        ids.extend(t)
        mask.extend([int(trainable)] * len(t))

    prev = render([])
    add(prev, False)
    after_assistant = False
    for i, m in enumerate(msgs):
        text = render(msgs[: i + 1])
        if not text.startswith(prev):
            raise ValueError(f"message {i}: the chat template is not prefix-stable")
        piece = text[len(prev):]
        prev = text
        start = len(ids)
        if m.get("role") == "assistant":
            if not piece.startswith(ASSISTANT):
                raise ValueError(f"message {i}: assistant turn does not start with {ASSISTANT}")
            add(ASSISTANT, False)
            add(piece[len(ASSISTANT):], True)
        else:
            add(piece, False)
        if after_assistant and len(ids) > start:
            mask[start] = 1  # the role token that ends the assistant's turn is the assistant's to produce
        after_assistant = m.get("role") == "assistant"
    if after_assistant:  # conversation ends on the assistant: train the turn's stop token
        add(OBSERVATION if msgs[-1].get("tool_calls") else USER, True)
    return ids, mask


def render_record(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one SFT record: a conversation ({"messages", "tools"?}) trained on the assistant's
    tokens, or a plain document ({"text"}) trained on all of its tokens followed by EOS."""
    if "messages" in record:
        return render_conversation(tokenizer, record["messages"], record.get("tools"))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("text records need a tokenizer with an EOS token")
    ids = tokenizer.encode(record["text"]) + [eos]
    return ids, [1] * len(ids)


# --------------------------------------------------------------------------- worked arithmetic
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _num(node) -> Fraction | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -Fraction(node.operand.value)
    return None


def _const(v: Fraction):
    if v.denominator != 1:
        raise ValueError("non-integer intermediate")
    n = int(v)
    return ast.Constant(n) if n >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-n))


def _reduce_once(node):
    """Evaluate the leftmost operation whose operands are numbers; return (new node, description) or None."""
    if _num(node) is not None:
        return None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _num(node.operand)
        if v is not None:
            return _const(-v), f"-({_fmt(v)}) = {_fmt(-v)}"
        r = _reduce_once(node.operand)
        return (ast.UnaryOp(ast.USub(), r[0]), r[1]) if r else None
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _num(node.left), _num(node.right)
        if a is not None and b is not None:
            op = _OPS[type(node.op)]
            v = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
            if v is None:
                raise ValueError("division by zero")
            return _const(v), f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(v)}"
        r = _reduce_once(node.left)
        if r:
            return ast.BinOp(r[0], node.op, node.right), r[1]
        r = _reduce_once(node.right)
        return (ast.BinOp(node.left, node.op, r[0]), r[1]) if r else None
    raise ValueError(f"unsupported expression node {type(node).__name__}")


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def worked_arithmetic(expression: str) -> tuple[str, str]:
    """Step-by-step evaluation of an integer expression: (reasoning, answer)."""
    node = ast.parse(expression.replace("−", "-"), mode="eval").body
    steps = []
    while True:
        r = _reduce_once(node)
        if r is None:
            break
        node, desc = r
        steps.append(desc)
    answer = _fmt(_num(node))
    if not steps:
        return f"The expression is just the number {answer}.", answer
    lines = [f"I evaluate {expression.strip()} one operation at a time, respecting precedence and parentheses."]
    lines += [f"{desc}." for desc in steps]
    lines.append(f"So the result is {answer}.")
    return "\n".join(lines), answer


def _gcd_steps(a: int, b: int) -> list[str]:
    out = []
    while b:
        out.append(f"{a} = {a // b} × {b} + {a % b}")
        a, b = b, a % b
    return out


# ------------------------------------------------------------------------------- task writers
def _solve(name: str, e: dict) -> str | None:
    """Reasoning for one reasoning-gym entry, or None when we cannot write a faithful one."""
    md = e["metadata"]
    if name in ("basic_arithmetic", "chain_sum"):
        reasoning, answer = worked_arithmetic(md["expression"])
        return reasoning if answer == str(e["answer"]).strip() else None
    if name == "gsm_symbolic":
        cot = md.get("answer_cot")
        if not cot:
            return None
        return "\n".join(l for l in cot.strip().splitlines() if not l.startswith("####")).strip()
    if name == "leg_counting":
        from reasoning_gym.arithmetic.leg_counting import ANIMALS

        lines, total = ["I count the legs of each kind of animal and add them up."], 0
        for animal, count in md["animals"].items():
            legs = ANIMALS[animal]
            total += legs * count
            lines.append(f"{count} {animal} × {legs} legs = {legs * count}.")
        lines.append(f"Total: {total} legs.")
        return "\n".join(lines) if str(total) == str(e["answer"]) else None
    if name == "gcd":
        nums = md["numbers"]
        g, lines = nums[0], ["I use the Euclidean algorithm."]
        for n in nums[1:]:
            lines += [s + "." for s in _gcd_steps(max(g, n), min(g, n))]
            g = math.gcd(g, n)
            lines.append(f"gcd = {g}.")
        return "\n".join(lines) if str(g) == str(e["answer"]) else None
    if name == "lcm":
        nums = md["numbers"]
        l, lines = nums[0], ["lcm(a, b) = a × b / gcd(a, b)."]
        for n in nums[1:]:
            g = math.gcd(l, n)
            lines.append(f"gcd({l}, {n}) = {g}, so lcm = {l} × {n} / {g} = {l * n // g}.")
            l = l * n // g
        return "\n".join(lines) if str(l) == str(e["answer"]) else None
    if name == "fraction_simplification":
        a, b = md["numerator"], md["denominator"]
        g = math.gcd(a, b)
        lines = ["I divide numerator and denominator by their greatest common divisor."]
        lines += [s + "." for s in _gcd_steps(max(a, b), min(a, b))]
        lines.append(f"gcd({a}, {b}) = {g}; {a} / {g} = {a // g} and {b} / {g} = {b // g}.")
        lines.append(f"The simplified fraction is {a // g}/{b // g}.")
        return "\n".join(lines)
    return None


DEFAULT_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting", "gcd", "lcm",
                 "fraction_simplification")

_NAMES = ["Alice", "Bob", "Carmen", "Dmitri", "Emeka", "Fatima", "Giulia", "Hiro", "Ines", "Jamal", "Keiko", "Lars",
          "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tariq"]
_CITIES = ["Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Hanoi", "Quito", "Perth", "Tunis", "Riga"]
_THINGS = ["apples", "marbles", "books", "coins", "stamps", "pencils", "shells", "cards"]
_MONTHS = ["January", "March", "May", "July", "September", "November"]


def unanswerable_question(rng: random.Random) -> tuple[str, str]:
    """(question, reasoning) for a question that cannot be answered from what is given."""
    name, city, thing = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_THINGS)
    k, year, day, month = rng.randint(2, 60), rng.randint(2031, 2090), rng.randint(1, 28), rng.choice(_MONTHS)
    kinds = [
        (f"{name} has a box of {thing}. {name} puts {k} more {thing} into it. How many {thing} are in the box now?",
         f"The question never says how many {thing} were in the box to begin with. Without the starting amount "
         f"the total after adding {k} cannot be determined."),
        (f"What is {name}'s phone number?",
         f"Nothing tells me who this {name} is, and a private phone number is not something I can work out. "
         "There is no information to answer from."),
        (f"What will the exact temperature be in {city} at noon on {month} {day}, {year}?",
         f"That is a precise forecast for {year}, far in the future. No one can know it now."),
        ("What number am I thinking of right now?",
         "The number exists only in the asker's head; nothing in the question reveals it."),
        (f"How many {thing} did {name} have yesterday?",
         f"The question gives no information at all about {name}'s {thing}."),
        (f"Compute {k} × x, where x is a number I have not told you.",
         f"The product depends on x, and x is not given, so the value of {k} × x is unknown."),
        (f"What did {name} eat for breakfast on {month} {day}?",
         f"I have no record of {name}'s meals; nothing given lets me answer."),
        (f"A train leaves {city} at some time and travels {k * 10} km. At what time does it arrive?",
         "Neither the departure time nor the speed is given, so the arrival time cannot be computed."),
    ]
    q, why = rng.choice(kinds)
    return q, why + " So the honest answer is that I don't know."


CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}


def _tool_conversation(rng: random.Random) -> dict:
    terms = [rng.randint(10, 999) for _ in range(rng.randint(2, 4))]
    ops = [rng.choice(["+", "-", "*"]) for _ in terms[1:]]
    expr = str(terms[0]) + "".join(f" {o} {t}" for o, t in zip(ops, terms[1:]))
    _, answer = worked_arithmetic(expr)
    return {
        "tools": [CALCULATOR_TOOL],
        "messages": [
            {"role": "user", "content": f"Use the calculator to compute {expr}."},
            {"role": "assistant", "reasoning_content": "The user wants the calculator used; I call it with the expression.",
             "content": "", "tool_calls": [{"type": "function", "function": {"name": "calculator",
                                                                             "arguments": {"expression": expr}}}]},
            {"role": "tool", "content": answer},
            {"role": "assistant", "reasoning_content": f"The calculator returned {answer}.", "content": answer},
        ],
        "meta": {"task": "calculator_tool", "answer": answer},
    }


def default_sft_conversations(n: int = 2000, seed: int = 0, idk_fraction: float = 0.15,
                              tool_fraction: float = 0.1, tasks: Sequence[str] = DEFAULT_TASKS) -> list[dict]:
    """The offline default SFT set: ``n`` conversations ({"messages", "tools"?, "meta"}), deterministic in seed."""
    import reasoning_gym as rg

    rng = random.Random(seed)
    n_idk = round(n * idk_fraction)
    n_tool = round(n * tool_fraction)
    n_task = n - n_idk - n_tool
    convs: list[dict] = []
    per_task = -(-n_task // len(tasks))
    for ti, name in enumerate(tasks):
        ds = rg.create_dataset(name, size=per_task * 2, seed=seed * 1000 + ti)
        made = 0
        for e in ds:
            if made >= per_task:
                break
            try:
                reasoning = _solve(name, e)
            except (ValueError, ZeroDivisionError, KeyError):
                reasoning = None
            if reasoning is None:
                continue
            convs.append({"messages": [{"role": "user", "content": e["question"].strip()},
                                       {"role": "assistant", "reasoning_content": reasoning,
                                        "content": str(e["answer"]).strip()}],
                          "meta": {"task": name, "answer": str(e["answer"]).strip()}})
            made += 1
    convs = convs[:n_task]
    for _ in range(n_idk):
        q, why = unanswerable_question(rng)
        convs.append({"messages": [{"role": "user", "content": q},
                                   {"role": "assistant", "reasoning_content": why, "content": IDK}],
                      "meta": {"task": "unanswerable", "answer": IDK}})
    for _ in range(n_tool):
        convs.append(_tool_conversation(rng))
    rng.shuffle(convs)
    return convs


# ------------------------------------------------------------------------------------- storage
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                   "observation": "tool", "tool": "tool", "function_response": "tool"}


def normalize_record(rec) -> dict:
    """One SFT record in our form ({"messages", "tools"?} or {"text"}) from the common dataset layouts:
    OpenAI messages as they are; ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system"|"observation",
    "value"}], "system"?, "tools"?}`` (a ``function_call`` turn's value is the call's JSON, ``tools`` may be a JSON
    string, as LLaMA-Factory writes them); Alpaca ``{"instruction", "input"?, "output", "system"?}``. ValueError for
    anything else."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec or "text" in rec:
        return rec
    tools = rec.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"'tools' is a string but not JSON: {e}") from None
    msgs: list[dict] = []
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        msgs.append({"role": "system", "content": rec["system"]})
    if isinstance(rec.get("conversations"), list):  # ShareGPT
        for k, turn in enumerate(rec["conversations"]):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ValueError(f"conversations[{k}] needs a string 'value'")
            who = turn.get("from")
            if who == "function_call":
                try:
                    calls = json.loads(turn["value"])
                except json.JSONDecodeError as e:
                    raise ValueError(f"conversations[{k}]: a function_call value must be JSON: {e}") from None
                calls = calls if isinstance(calls, list) else [calls]
                msgs.append({"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": c.get("name"), "arguments": c.get("arguments", {})}}
                    for c in calls if isinstance(c, dict)]})
            elif who in _SHAREGPT_ROLES:
                msgs.append({"role": _SHAREGPT_ROLES[who], "content": turn["value"]})
            else:
                raise ValueError(f"conversations[{k}]: unknown speaker {who!r} (known: "
                                 f"{', '.join(sorted(_SHAREGPT_ROLES))}, function_call)")
    elif isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):  # Alpaca
        prompt = rec["instruction"]
        if isinstance(rec.get("input"), str) and rec["input"].strip():
            prompt = f"{prompt}\n\n{rec['input']}"
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
    else:
        raise ValueError(f"expected 'messages', ShareGPT 'conversations', Alpaca 'instruction'/'output' or 'text'; "
                         f"got fields {sorted(rec)[:8]}")
    return {"messages": msgs, **({"tools": tools} if tools else {})}


def _records(f: Path):
    """(where, record) of a .jsonl file (one per line) or a .json file (one array of records, or one record; JSON
    Lines named .json are read as such)."""
    if f.suffix.lower() == ".json":
        try:
            data = json.loads(f.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError:
            data = None  # perhaps JSON Lines: the line reader below names the bad line
        if data is not None:
            # a .json file has no per-record lines: number the records instead
            yield from ((f"record {k + 1}", r) for k, r in enumerate(data if isinstance(data, list) else [data]))
            return
    yield from ((str(n), rec) for n, rec in read_jsonl(f, errors="replace"))


def read_conversations(files: Iterable[Path]) -> list[dict]:
    """SFT records from .jsonl files (one record per line) or .json files (an array of records): OpenAI
    ``{"messages": [...], "tools": [...]?}``, ShareGPT, Alpaca (see :func:`normalize_record`) or ``{"text": "..."}``.
    A record that cannot be trained on is a ValueError naming its file and line; bytes that are not valid
    UTF-8 become U+FFFD (as in pretraining text)."""
    out = []
    for f in files:
        f = Path(f)
        if f.suffix.lower() not in (".jsonl", ".json"):
            raise ValueError(f"{f}: SFT data must be .jsonl or .json files of {{\"messages\": [...]}} (or ShareGPT / "
                             f"Alpaca) records or {{\"text\": ...}} (use glm5 train for plain text)")
        for where, rec in _records(f):
            try:
                rec = normalize_record(rec)
                if "messages" in rec:
                    check_messages(rec["messages"])
                    if rec.get("tools") is not None and not isinstance(rec["tools"], list):
                        raise ValueError("'tools' must be a list")
                elif not (isinstance(rec.get("text"), str) and rec["text"].strip()):
                    raise ValueError("expected an object with a 'messages' list or a non-empty 'text'")
            except ValueError as e:
                raise ValueError(f"{f}:{where}: {e}") from None
            out.append(rec)
    return out


def build_sft_dataset(conversations: Sequence[dict], tokenizer, out_dir: str | os.PathLike, *,
                      val_fraction: float = 0.05, seed: int = 0, source: str = "") -> dict:
    """Render, tokenise and store SFT records (conversations or text); a deterministic ``val_fraction`` is
    held out."""
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    n = len(conversations)
    n_val = min(n - 1, max(1, round(val_fraction * n))) if val_fraction > 0 and n > 1 else 0
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    rendered = []
    for i, conv in enumerate(conversations):  # all of it before anything is written: a bad record leaves no debris
        try:
            rendered.append(render_record(tokenizer, conv))
        except ValueError as e:
            raise ValueError(f"SFT record {i}: {e}") from None
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    splits = {}
    for split in ("train", "val"):
        ids_all, mask_all, offsets = [], [], [0]
        for i, (ids, mask) in enumerate(rendered):
            if (i in val_idx) != (split == "val"):
                continue
            ids_all.extend(ids)
            mask_all.extend(mask)
            offsets.append(len(ids_all))
        np.asarray(ids_all, dtype=dtype).tofile(tmp / f"{split}.bin")
        np.asarray(mask_all, dtype=np.uint8).tofile(tmp / f"{split}.mask.bin")
        np.save(tmp / f"{split}.offsets.npy", np.asarray(offsets, dtype=np.int64))
        splits[split] = {"file": f"{split}.bin", "tokens": len(ids_all), "conversations": len(offsets) - 1,
                         "loss_tokens": int(sum(mask_all))}
    manifest = {"format": SFT_FORMAT, "tokenizer_fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                "dtype": dtype.name, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                "source": source, "val_fraction": val_fraction, "seed": seed, "splits": splits,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json_atomic(tmp / "manifest.json", manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return manifest


def prepare_sft_dataset(sources, tokenizer, cache_dir: str | os.PathLike, *, n_default: int = 2000,
                        val_fraction: float = 0.05, seed: int = 0) -> Path:
    """A cached SFT dataset directory for ``sources`` ("default" = the generated set, or .jsonl files/dirs)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if [str(s) for s in sources] == ["default"]:
        import reasoning_gym

        files, desc = [], f"default:n={n_default}:seed={seed}:rg={getattr(reasoning_gym, '__version__', '?')}"
    else:
        files = resolve_sources(sources)
        desc = "files:" + sources_fingerprint(files)
    key = hashlib.sha256(f"{desc}\0{tokenizer.fingerprint()}\0{val_fraction}\0{SFT_FORMAT}".encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"sft-{key}"
    if (out / "manifest.json").exists():
        return out
    convs = default_sft_conversations(n_default, seed=seed) if not files else read_conversations(files)
    build_sft_dataset(convs, tokenizer, out, val_fraction=val_fraction, seed=seed, source=desc)
    return out


def load_sft_split(path: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(tokens, loss_mask, offsets, manifest) of one split, memory-mapped."""
    path = Path(path)
    m = json.loads((path / "manifest.json").read_text())
    if m.get("format") != SFT_FORMAT:
        raise ValueError(f"{path}: not an SFT dataset ({m.get('format')!r})")
    if m["splits"][split]["tokens"] == 0:
        z = np.zeros(0, dtype=np.dtype(m["dtype"]))
        return z, z.astype(np.uint8), np.zeros(1, dtype=np.int64), m
    tokens = np.memmap(path / f"{split}.bin", dtype=np.dtype(m["dtype"]), mode="r")
    mask = np.memmap(path / f"{split}.mask.bin", dtype=np.uint8, mode="r")
    offsets = np.load(path / f"{split}.offsets.npy")
    return tokens, mask, offsets, m
