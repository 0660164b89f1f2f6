"""Constrained decoding cost per generated token (not a test): ``json_object``, ``json_schema`` (plain, and with
``format`` / ``pattern`` strings), ``regex``, GBNF ``grammar`` and ``structural_tag`` grammars on a
byte-level BPE trained here on the default corpus, driven by random logits as a model's sampler would be (which
rarely write a trigger: vLLM's ``structures`` form measures free text, xgrammar's ``at_least_one`` form a call first).

    python3 benchmarks/bench_grammar.py --vocab 8192 32768

Per vocabulary size: the time ``ConstrainedLogitsProcessor`` adds to one decoding step, first with a fresh grammar
("cold": every state's allowed tokens come from a trie walk) and again on the same grammar object ("warm": the
server keeps compiled grammars of recent schemas, so a repeated schema finds its states' allowed sets cached).
"""

from __future__ import annotations

import argparse
import statistics
import sys
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    texts = [Path(f).read_text(encoding="utf-8") for f in default_corpus_files()]
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
                                JsonGrammar(vocab, schema=compile_structural_tag(FIRST_TAG)))):
            for cache in ("cold", "warm"):
                if cache == "cold":
                    grammar._cache.clear()
                    grammar._index_cache.clear()
                    grammar._moves_cache.clear()
                    grammar._moves_held = 0
                times = [t for s in range(args.seeds) for t in run(grammar, vocab, args.max_tokens, s)]
                print(f"| {V:,} | {label} | {cache} | {len(times)} | {1e3 * statistics.mean(times):.2f} | "
                      f"{1e3 * statistics.median(times):.2f} | {1e3 * max(times):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
