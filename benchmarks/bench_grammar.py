"""Constrained decoding cost per generated token (not a test): ``json_object``, ``json_schema`` (plain, and with
``format`` / ``pattern`` strings), ``regex``, GBNF ``grammar`` and ``structural_tag`` grammars on a
byte-level BPE trained here on the default corpus, driven by random logits as a model's sampler would be (which
rarely write a trigger: vLLM's ``structures`` form measures free text, xgrammar's ``at_least_one`` form a call first).

    python3 benchmarks/bench_grammar.py --vocab 8192 32768

Per vocabulary size: the time ``ConstrainedLogitsProcessor`` adds to one decoding step, first with a fresh grammar
("cold": every state's allowed tokens come from a trie walk) and again on the same grammar object ("warm": the
server keeps compiled grammars of recent schemas, so a repeated schema finds its states' allowed sets cached).

    python3 benchmarks/bench_grammar.py --first-visit --vocab 32768 --synthetic 150000

First visits of grammar states, old walk against new in one run: each kind's outputs are sampled once (random
logits, new grammar), then replayed through a fresh grammar of each implementation, timing the processor at every
state the grammar meets for the first time (its allowed tokens come from a trie walk, on the engine thread; with
the garbage collector off during a replay, as ``timeit`` does). "Old" is
``glm5/structured`` as of ``--baseline`` (a git revision, imported from ``git show``: the node-by-node walk), "new"
the working tree's. ``--synthetic N`` adds a vocabulary of N ids: the largest trained one plus generated tokens
(concatenations, CJK, Cyrillic and accented words, emoji, code, numbers, partial UTF-8), like a 150K multilingual
BPE's. Cold: the table columns' "first" row is each kind's very first state on a fresh grammar.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm5.data.corpus import default_corpus_files  # noqa: E402
from glm5.structured.constrained import ConstrainedLogitsProcessor, JsonGrammar, TokenVocab  # noqa: E402
from glm5.structured.gbnf import GbnfAutomaton  # noqa: E402
from glm5.structured.json_schema import compile_schema  # noqa: E402
from glm5.structured.regex import RegexAutomaton  # noqa: E402
from glm5.structured.structural_tag import compile_structural_tag  # noqa: E402
from glm5.tokenizer import train_bpe  # noqa: E402
from glm5.tokenizer.detokenize import byte_level_char_to_byte  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "mood", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "mood": {"enum": ["happy", "sad", "angry"]}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}}}
# strings under pattern / format go through the regex automaton instead of the plain-string fast path
FORMATTED = {"type": "object", "additionalProperties": False, "required": ["id", "at", "code", "note"], "properties": {
    "id": {"type": "string", "format": "uuid"}, "at": {"type": "string", "format": "date-time"},
    "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3,6}$"}, "note": {"type": "string", "pattern": "[a-z ]{5,40}"}}}
# one JSON object written as a GBNF grammar: the same language as json_object's built-in automaton, through the
# general pushdown automaton instead
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( string ws ":" ws value ws ( "," ws string ws ":" ws value ws )* )? "}"
array  ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws     ::= [ \t\n]?
"""
REGEX = r"[A-Z][a-z]{1,20}( [A-Z][a-z]{1,20}){0,3}, \d{1,4} [A-Z][a-z]+ (St|Rd|Ave)\."
TAGS = {"triggers": ["<fn="], "structures": [{"begin": "<fn=person>", "schema": SCHEMA, "end": "</fn>"}]}
FIRST_TAG = {"format": {"type": "triggered_tags", "triggers": ["<fn="], "at_least_one": True, "tags": [
    {"type": "tag", "begin": "<fn=person>", "end": "</fn>",
     "content": {"type": "json_schema", "json_schema": SCHEMA}}]}}


def run(grammar, vocab, max_tokens: int, seed: int) -> list[float]:
    proc = ConstrainedLogitsProcessor(grammar, max_tokens)
    gen = torch.Generator().manual_seed(seed)
    out, times = [], []
    for _ in range(max_tokens):
        logits = torch.randn(vocab.size, generator=gen) * 2
        t = time.perf_counter()
        masked = proc(out, logits)
        times.append(time.perf_counter() - t)
        tok = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
        out.append(tok)
        if tok in vocab.eos_ids:
            break
    return times


# ======================================================================================== first visits
BASELINE = "f4bfd9f"  # the last revision of glm5/structured with the node-by-node walk
MODULES = ("constrained", "json_schema", "regex", "gbnf", "structural_tag", "choice", "tool_grammar")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "location": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"enum": ["celsius", "fahrenheit"]}, "when": {"type": "string", "format": "date"}},
    "required": ["location", "days"]}}}]
# typed values with strings inside (JSON-encoded): the tool grammar's string fast path rather than free text
JSON_TOOLS = [{"type": "function", "function": {"name": "tag", "parameters": {"type": "object", "properties": {
    "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "meta": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30}, "by": {"type": "string"}},
             "required": ["title"], "additionalProperties": False}},
    "required": ["labels", "meta"]}}}]
# objects that allow extra keys: a key that begins no declared name is an extra key, typed with random logits (three
# objects: random logits close a lone one at once as often as not)
EXTRA_KEYS = {"type": "array", "minItems": 3, "maxItems": 3, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
    "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 999}}}
EXTRA_TOOLS = [{"type": "function", "function": {"name": "label", "parameters": {"type": "object", "properties": {
    "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 12}}},
    "required": ["labels"]}}}]


def load_structured(rev: str | None) -> dict:
    """The modules of glm5/structured: the working tree's (``rev`` None) or those of git revision ``rev``, imported
    from ``git show`` as a separate package."""
    if rev is None:
        return {m: importlib.import_module(f"glm5.structured.{m}") for m in MODULES}
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    names = subprocess.run([*git, "ls-tree", "--name-only", f"{rev}:glm5/structured"], capture_output=True, text=True,
                           check=True).stdout.split()
    pkg = Path(tempfile.mkdtemp()) / "structured_baseline"
    pkg.mkdir()
    for name in names:
        if name.endswith(".py"):
            (pkg / name).write_bytes(subprocess.run([*git, "show", f"{rev}:glm5/structured/{name}"],
                                                    capture_output=True, check=True).stdout)
    sys.path.insert(0, str(pkg.parent))
    return {m: importlib.import_module(f"structured_baseline.{m}") for m in MODULES}


def kinds(m: dict, vocab) -> dict:
    """Grammar builders per constraint kind, from the modules ``m`` of one implementation."""
    json_grammar = m["constrained"].JsonGrammar
    return {
        "json_object": lambda: json_grammar(vocab),
        "json_schema": lambda: json_grammar(vocab, schema=m["json_schema"].compile_schema(SCHEMA)),
        "json_schema, format/pattern": lambda: json_grammar(vocab, schema=m["json_schema"].compile_schema(FORMATTED)),
        "regex": lambda: json_grammar(vocab, schema=m["regex"].RegexAutomaton(REGEX)),
        "choice": lambda: json_grammar(vocab, schema=m["choice"].ChoiceAutomaton(["positive", "negative", "neutral",
                                                                                 "mixed"])),
        "GBNF (JSON object)": lambda: json_grammar(vocab, schema=m["gbnf"].GbnfAutomaton(JSON_GBNF)),
        "structural_tag (structures)": lambda: json_grammar(vocab, schema=m["structural_tag"].compile_structural_tag(
            TAGS)),
        "structural_tag (at_least_one)": lambda: json_grammar(vocab, schema=m["structural_tag"].compile_structural_tag(
            FIRST_TAG)),
        "tool call (required)": lambda: m["tool_grammar"].ToolCallGrammar(vocab, TOOLS),
        "tool call (JSON strings)": lambda: m["tool_grammar"].ToolCallGrammar(vocab, JSON_TOOLS),
        "json_schema, extra keys": lambda: json_grammar(vocab, schema=m["json_schema"].compile_schema(EXTRA_KEYS)),
        "tool call (extra keys)": lambda: m["tool_grammar"].ToolCallGrammar(vocab, EXTRA_TOOLS),
    }


class _Added:
    def __init__(self, content: str):
        self.content = content


class SyntheticBackend:
    """A tokenizer backend of ``size`` ids: ``base``'s ordinary tokens, generated ones, then ``base``'s added tokens
    (GLM-5's specials), so that the grammars find ``<tool_call>``, ``</think>`` and EOS."""

    def __init__(self, base, size: int, seed: int = 0):
        base = getattr(base, "backend", base)
        n = base.get_vocab_size(with_added_tokens=True)
        added = base.get_added_tokens_decoder()
        chars = {b: c for c, b in byte_level_char_to_byte().items()}
        table = byte_level_char_to_byte()
        ordinary = [base.id_to_token(i) for i in range(n) if i not in added and base.id_to_token(i) is not None]
        seen = {bytes(table[c] for c in t) for t in ordinary}
        words = [bytes(table[c] for c in t) for t in ordinary]
        rng = random.Random(seed)
        cyr = "абвгдежзийклмнопрстуфхцчшщъыьэюяαβγδεζηθλμπρστφωéèêàçñöüßøå"
        code = ["    ", "\n", "\t", "();", "{}", "=>", "return ", "def ", "self.", "import ", "//", "/*", "<div>"]
        target = size - n
        extra: list[bytes] = []
        while len(extra) < target:
            r = rng.random()
            if r < 0.4:
                data = rng.choice(words) + rng.choice(words)
            elif r < 0.6:
                data = "".join(chr(rng.randrange(0x4E00, 0xA000)) for _ in range(rng.randint(1, 3))).encode()
            elif r < 0.72:
                data = (" " * rng.randint(0, 1) + "".join(rng.choice(cyr) for _ in range(rng.randint(2, 8)))).encode()
            elif r < 0.82:
                data = (rng.choice(code) + rng.choice(words).decode("utf-8", "replace")).encode()
            elif r < 0.9:
                data = (" " * rng.randint(0, 1) + str(rng.randrange(10 ** rng.randint(1, 6)))).encode()
            elif r < 0.95:
                data = "".join(chr(rng.randrange(0x1F300, 0x1FAFF)) for _ in range(rng.randint(1, 2))).encode()
            else:
                full = chr(rng.randrange(0x4E00, 0xA000)).encode()
                data = full[:2] if rng.random() < 0.5 else full[1:]
            if data and data not in seen:
                seen.add(data)
                extra.append(data)
        self.tokens = ordinary + ["".join(chars[b] for b in d) for d in extra]
        self.added = {len(self.tokens) + k: _Added(t.content) for k, t in enumerate(added.values())}
        self.size = len(self.tokens) + len(self.added)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.size

    def get_added_tokens_decoder(self):
        return self.added

    def id_to_token(self, i: int):
        return self.tokens[i] if i < len(self.tokens) else self.added[i].content


def sample_outputs(grammar, vocab, max_tokens: int, seeds: int) -> list[list[int]]:
    out = []
    for seed in range(seeds):
        proc = ConstrainedLogitsProcessor(grammar, max_tokens)
        gen = torch.Generator().manual_seed(seed)
        ids: list[int] = []
        for _ in range(max_tokens):
            logits = proc(ids, torch.randn(vocab.size, generator=gen) * 2)
            ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
            if ids[-1] in vocab.eos_ids:
                break
        out.append(ids)
    return out


def first_visits(grammar, outputs: list[list[int]], max_tokens: int, size: int) -> list[float]:
    """Replays ``outputs`` through ``grammar``: the processor's time at each state it meets for the first time."""
    times, seen = [], set()
    logits = torch.zeros(size)
    # what a vocabulary keeps for every grammar on it (free text's allowed ids) was filled while sampling: a replay
    # pays for it again, as the first request does
    getattr(grammar.vocab, "shared", {}).clear()
    gc.collect()  # as timeit does, no garbage collection while timing: the grammars' caches are large
    gc.disable()
    for ids in outputs:
        proc = ConstrainedLogitsProcessor(grammar, max_tokens)
        for t in range(len(ids)):
            state = proc.state_for(ids[:t])
            if state in seen:
                continue
            seen.add(state)
            start = time.perf_counter()
            proc(ids[:t], logits)
            times.append(time.perf_counter() - start)
    gc.enable()
    return times


def bench_first_visits(args, vocab_sizes: list[int], synthetic: list[int], texts: list[str]) -> None:
    impls = {"old": load_structured(args.baseline), "new": load_structured(None)}
    print("| vocab | grammar | first visits | old: first | mean | max | new: first | mean | max | old/new (sum) |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    tokenizers = [(V, train_bpe(texts, vocab_size=V)) for V in vocab_sizes]
    cases = [(len(tok), tok) for _, tok in tokenizers]
    cases += [(N, SyntheticBackend(tokenizers[-1][1], N)) for N in synthetic]
    built = []
    for n_ids, tok in cases:
        vocabs = {}
        for name, m in impls.items():
            start = time.perf_counter()
            vocabs[name] = m["constrained"].TokenVocab(tok)
            built.append(f"{name} {time.perf_counter() - start:.2f} s")
        builders = {name: kinds(m, vocabs[name]) for name, m in impls.items()}
        for label in builders["new"]:
            if args.kinds and not any(k in label for k in args.kinds):
                continue
            grammar = builders["new"][label]()
            budget = max(args.max_tokens, grammar.min_close(grammar.start()) + 20)
            outputs = sample_outputs(grammar, vocabs["new"], budget, args.seeds)
            res = {name: first_visits(builders[name][label](), outputs, budget, vocabs[name].size) for name in impls}
            cells = [f"{1e3 * ts[0]:.1f} | {1e3 * statistics.mean(ts):.2f} | {1e3 * max(ts):.1f}"
                     for ts in res.values()]
            old_n, new_n = len(res["old"]), len(res["new"])
            visits = str(new_n) if old_n == new_n else f"{old_n} / {new_n}"  # fewer distinct states in the new
            print(f"| {n_ids:,} | {label} | {visits} | {cells[0]} | {cells[1]} | "
                  f"{sum(res['old']) / sum(res['new']):.1f}× |", flush=True)
    print("\nTokenVocab built in (per vocabulary, old then new): " + ", ".join(built))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-visit", action="store_true", help="time first visits of states, old walk vs new")
    ap.add_argument("--synthetic", type=int, nargs="*", default=[], help="with --first-visit: synthetic vocab sizes")
    ap.add_argument("--baseline", default=BASELINE, help="with --first-visit: git revision of the old walk")
    ap.add_argument("--kinds", nargs="*", default=[],
                    help="with --first-visit: only the grammars whose label contains one of these")
    args = ap.parse_args()
    torch.set_num_threads(1)
    texts = [Path(f).read_text(encoding="utf-8") for f in default_corpus_files()]
    if args.first_visit:
        bench_first_visits(args, args.vocab, args.synthetic, texts)
        return 0
    print("| vocab | grammar | cache | tokens | mean ms/token | median | max |\n|---:|---|---|---:|---:|---:|---:|")
    for V in args.vocab:
        vocab = TokenVocab(train_bpe(texts, vocab_size=V))
        for label, grammar in (("json_object", JsonGrammar(vocab)),
                               ("json_schema", JsonGrammar(vocab, schema=compile_schema(SCHEMA))),
                               ("json_schema, format/pattern", JsonGrammar(vocab, schema=compile_schema(FORMATTED))),
                               ("regex", JsonGrammar(vocab, schema=RegexAutomaton(REGEX))),
                               ("GBNF (JSON object)", JsonGrammar(vocab, schema=GbnfAutomaton(JSON_GBNF))),
                               ("structural_tag (structures)", JsonGrammar(vocab, schema=compile_structural_tag(TAGS))),
                               ("structural_tag (at_least_one)",
                                JsonGrammar(vocab, schema=compile_structural_tag(FIRST_TAG))),
                               ("json_schema, extra keys", JsonGrammar(vocab, schema=compile_schema(EXTRA_KEYS)))):
            for cache in ("cold", "warm"):
                if cache == "cold":
                    grammar.clear_caches()  # allowed sets, move lists and the trie walk's transition table
                times = [t for s in range(args.seeds) for t in run(grammar, vocab, args.max_tokens, s)]
                print(f"| {V:,} | {label} | {cache} | {len(times)} | {1e3 * statistics.mean(times):.2f} | "
                      f"{1e3 * statistics.median(times):.2f} | {1e3 * max(times):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
