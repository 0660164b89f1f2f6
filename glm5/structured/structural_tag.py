"""``structural_tag`` structured output (vLLM's ``structured_outputs.structural_tag`` / ``response_format`` type
``structural_tag``, xgrammar's semantics): free text with structured parts, e.g. tool calls in a model's own syntax.

Two forms are accepted, as a dict or as its JSON text (vLLM passes the text):

* vLLM's original one, ``{"type": "structural_tag", "structures": [{"begin", "schema", "end"}, ...], "triggers":
  [...]}``: text is free until a trigger appears; from the trigger on the output must go on as one of the structures
  whose ``begin`` starts with it, then JSON that structure's ``schema`` accepts, then its ``end``; then free text
  again. Every ``begin`` must start with a trigger, and no trigger may be a prefix of another (as xgrammar requires).
* xgrammar's ``{"type": "structural_tag", "format": {...}}``, a tree of formats. Supported: ``const_string``,
  ``json_schema`` (style ``json``), ``regex``, ``grammar`` (GBNF, see :mod:`glm5.structured.gbnf`), ``any_text``
  (``excludes``), ``sequence``, ``or``, ``optional``, ``star``, ``plus``, ``repeat``, ``tag`` (string ``begin``,
  string or list of strings ``end``), ``triggered_tags`` (``triggers``, ``tags``, ``excludes``, ``at_least_one``,
  ``stop_after_first``) and ``tags_with_separator``. Refused with a :class:`StructuralTagError` naming the part: the
  token-level formats (``token``, ``exclude_token``, ``any_tokens``, ``token_triggered_tags``, ``token_dispatch``),
  ``dispatch``, token ``begin`` / ``end``, ``any_text`` length limits, XML ``style`` s and ``any_order``.

Free text has no end of its own, so ``any_text`` and ``triggered_tags`` (unless ``at_least_one`` and
``stop_after_first``: exactly one tag) must end the output or be the content of a ``tag`` (possibly the last part of
a ``sequence`` or an ``or`` branch there); inside a tag its end string ends them at its first occurrence, as in
xgrammar. Elsewhere they are refused (what follows could never be told from the text).

Limits: triggers, excludes and the end strings that end free text are at most 256 bytes each and 8,192 in all
(:data:`glm5.structured.tag_dispatch.MAX_STRING`); other strings 4,096 bytes; 1,024 formats nested 32 deep.

JSON bodies are the JSON Schema automaton (:func:`glm5.structured.json_schema.compile_schema`, compact JSON, its
keyword subset); the free text with triggers is :class:`glm5.structured.tag_dispatch.TagDispatch`; the rest is
:mod:`glm5.structured.compose`. The result has the byte-automaton interface ``JsonGrammar`` walks the token trie with.
"""

from __future__ import annotations

import json
from typing import Any

from .compose import Alternatives, Concat, Literal, Repeat
from .gbnf import GbnfAutomaton
from .json_schema import compile_schema
from .regex import RegexAutomaton
from .tag_dispatch import TagDispatch

__all__ = ["StructuralTagError", "compile_structural_tag", "parse_structural_tag"]

MAX_FORMATS = 1024  # format objects in one structural tag
MAX_DEPTH = 32  # formats nested in formats
MAX_STRING_BYTES = 4096  # one begin / end / trigger / const_string / exclude
_TOKEN_LEVEL = ("token", "exclude_token", "any_tokens", "token_triggered_tags", "token_dispatch", "dispatch")
_EOS = "eos"  # tail: the output ends after this format


class StructuralTagError(ValueError):
    def __init__(self, message: str, path: str = "structural_tag"):
        super().__init__(f"{message} (at {path})")
        self.path = path


def parse_structural_tag(spec: Any) -> dict:
    """The structural tag as a dict (``spec`` may be its JSON text); StructuralTagError when it is not an object."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise StructuralTagError(f"not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise StructuralTagError(f"must be a JSON object, got {type(spec).__name__}")
    return spec


def compile_structural_tag(spec: Any):
    """The byte automaton of a structural tag (either form, dict or JSON text); StructuralTagError (a ValueError)
    for a malformed or unsupported one."""
    spec = parse_structural_tag(spec)
    if spec.get("type", "structural_tag") != "structural_tag":
        raise StructuralTagError(f"type must be 'structural_tag', got {spec.get('type')!r}")
    legacy = "structures" in spec or "triggers" in spec
    if legacy and "format" in spec:
        raise StructuralTagError("give either structures and triggers (vLLM's form) or format (xgrammar's), not both")
    if legacy:
        return _legacy(spec)
    if "format" not in spec:
        raise StructuralTagError("needs structures and triggers (vLLM's form) or format (xgrammar's)")
    try:
        return _Compiler().compile(spec["format"], "format", _EOS, 0)[0]
    except RecursionError:
        raise StructuralTagError(f"formats nested too deeply (at most {MAX_DEPTH} levels)") from None


# ================================================================================================= pieces
def _text(value: Any, path: str, empty_ok: bool = False) -> bytes:
    if not isinstance(value, str):
        raise StructuralTagError(f"must be a string, got {type(value).__name__}"
                                 + (" (token begin/end are not supported)" if isinstance(value, dict) else ""), path)
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise StructuralTagError("is not valid Unicode (a lone surrogate)", path) from None
    if not data and not empty_ok:
        raise StructuralTagError("must not be empty", path)
    if len(data) > MAX_STRING_BYTES:
        raise StructuralTagError(f"longer than {MAX_STRING_BYTES} bytes", path)
    return data


def _texts(value: Any, path: str, required: bool = True) -> list[bytes]:
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise StructuralTagError("must be a non-empty list of strings" if required else "must be a list of strings",
                                 path)
    if len(value) > 256:
        raise StructuralTagError("at most 256 strings", path)
    return [_text(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _flag(f: dict, key: str, path: str) -> bool:
    v = f.get(key, False)
    if not isinstance(v, bool):
        raise StructuralTagError("must be true or false", f"{path}.{key}")
    return v


def _check_triggers(triggers: list[bytes], path: str) -> None:
    for a in triggers:
        for b in triggers:
            if a is not b and b.startswith(a):
                raise StructuralTagError(f"trigger {a.decode()!r} is a prefix of trigger {b.decode()!r} (which would "
                                         "dispatch is ambiguous)", path)


def _trigger_of(begin: bytes, triggers: list[bytes], path: str) -> None:
    if not any(begin.startswith(t) for t in triggers):
        raise StructuralTagError(f"begin {begin.decode()!r} does not start with any trigger (triggers: "
                                 f"{', '.join(repr(t.decode()) for t in triggers)})", path)


def _schema(value: Any, path: str):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise StructuralTagError(f"schema is not valid JSON: {e}", path) from None
    if not isinstance(value, (dict, bool)):
        raise StructuralTagError("must be a JSON Schema object", path)
    try:
        return compile_schema(value)
    except ValueError as e:
        raise StructuralTagError(f"unsupported schema: {e}", path) from None


def _ends(ends: tuple[bytes, ...]):
    return Literal(ends[0]) if len(ends) == 1 else Alternatives([Literal(e) for e in ends])


def _legacy(spec: dict) -> TagDispatch:
    triggers = _texts(spec.get("triggers"), "triggers")
    _check_triggers(triggers, "triggers")
    structures = spec.get("structures")
    if not isinstance(structures, list) or not structures:
        raise StructuralTagError("must be a non-empty list of {begin, schema, end}", "structures")
    if len(structures) > MAX_FORMATS:
        raise StructuralTagError(f"at most {MAX_FORMATS} structures", "structures")
    tags = []
    for i, s in enumerate(structures):
        path = f"structures[{i}]"
        if not isinstance(s, dict):
            raise StructuralTagError("must be an object {begin, schema, end}", path)
        for key in ("begin", "schema", "end"):
            if key not in s:
                raise StructuralTagError(f"missing {key!r}", path)
        begin = _text(s["begin"], f"{path}.begin")
        _trigger_of(begin, triggers, f"{path}.begin")
        end = _text(s["end"], f"{path}.end", empty_ok=True)
        tags.append((begin, Concat([_schema(s["schema"], f"{path}.schema"), Literal(end)])))
    return _dispatch("structural_tag", triggers, tags)


def _dispatch(path: str, *args, **kwargs) -> TagDispatch:
    try:
        return TagDispatch(*args, **kwargs)
    except ValueError as e:
        raise StructuralTagError(str(e), path) from None


# =============================================================================================== formats
class _Compiler:
    """Formats -> automata. ``tail`` says what follows a format: ``_EOS`` (the output ends), the end strings of the
    enclosing tag (a tuple: the format may take them in, which free text must, to know where it stops) or None
    (something else). ``compile`` returns (automaton, whether it took the end strings in)."""

    def __init__(self):
        self.count = 0

    def compile(self, f: Any, path: str, tail, depth: int):
        self.count += 1
        if self.count > MAX_FORMATS:
            raise StructuralTagError(f"more than {MAX_FORMATS} formats", path)
        if depth > MAX_DEPTH:
            raise StructuralTagError(f"formats nested deeper than {MAX_DEPTH} levels", path)
        if not isinstance(f, dict):
            raise StructuralTagError("a format must be an object with a type", path)
        kind = f.get("type")
        build = getattr(self, "_" + kind, None) if isinstance(kind, str) and kind.isidentifier() else None
        if kind in _TOKEN_LEVEL:
            raise StructuralTagError(f"format {kind!r} is not supported (formats over text only)", path)
        if build is None:
            raise StructuralTagError(f"unknown format type {kind!r}", path)
        return build(f, path, tail, depth + 1)

    # ---- leaves
    def _const_string(self, f, path, tail, depth):
        return Literal(_text(f.get("value"), f"{path}.value", empty_ok=True)), False

    def _json_schema(self, f, path, tail, depth):
        if f.get("style", "json") != "json":
            raise StructuralTagError(f"style {f.get('style')!r} is not supported (only 'json')", f"{path}.style")
        if f.get("any_order"):
            raise StructuralTagError("any_order is not supported (properties come in schema order)", path)
        if "json_schema" not in f:
            raise StructuralTagError("missing 'json_schema'", path)
        return _schema(f["json_schema"], f"{path}.json_schema"), False

    def _regex(self, f, path, tail, depth):
        return _from_source(f, "pattern", path, RegexAutomaton), False

    def _grammar(self, f, path, tail, depth):
        return _from_source(f, "grammar", path, GbnfAutomaton), False

    def _any_text(self, f, path, tail, depth):
        for key in ("max_tokens", "max_chars"):
            if f.get(key) is not None:
                raise StructuralTagError(f"{key} is not supported", f"{path}.{key}")
        ends = self._free_ends(tail, path, "any_text")
        excludes = _texts(f.get("excludes"), f"{path}.excludes", required=False)
        return _dispatch(path, ends=ends, excludes=excludes), bool(ends)

    @staticmethod
    def _free_ends(tail, path: str, what: str) -> tuple[bytes, ...]:
        if tail is None:
            raise StructuralTagError(f"{what} must end the output or be the content of a tag with non-empty string "
                                     "ends: here nothing would tell where it stops", path)
        return () if tail == _EOS else tail

    # ---- combinations
    def _parts(self, f, path, key="elements"):
        parts = f.get(key)
        if not isinstance(parts, list) or not parts:
            raise StructuralTagError(f"{key} must be a non-empty list of formats", path)
        return parts

    def _sequence(self, f, path, tail, depth):
        parts = self._parts(f, path)
        built = [self.compile(p, f"{path}.elements[{i}]", tail if i == len(parts) - 1 else None, depth)
                 for i, p in enumerate(parts)]
        return (built[0][0] if len(built) == 1 else Concat([a for a, _ in built])), built[-1][1]

    def _choose(self, built: list, tail):
        """One of the built alternatives; when some take the end strings in, the others are given them too."""
        if any(took for _, took in built) and isinstance(tail, tuple):
            built = [(a if took else Concat([a, _ends(tail)]), True) for a, took in built]
        autos = [a for a, _ in built]
        return (autos[0] if len(autos) == 1 else Alternatives(autos)), built[0][1]

    def _or(self, f, path, tail, depth):
        parts = self._parts(f, path)
        return self._choose([self.compile(p, f"{path}.elements[{i}]", tail, depth) for i, p in enumerate(parts)], tail)

    def _optional(self, f, path, tail, depth):
        return self._choose([self.compile(f.get("content"), f"{path}.content", tail, depth), (Literal(b""), False)],
                            tail)

    def _repeated(self, f, path, depth, lo: int, hi: int | None):
        part, _ = self.compile(f.get("content"), f"{path}.content", None, depth)
        return Repeat(part, lo, hi), False

    def _star(self, f, path, tail, depth):
        return self._repeated(f, path, depth, 0, None)

    def _plus(self, f, path, tail, depth):
        return self._repeated(f, path, depth, 1, None)

    def _repeat(self, f, path, tail, depth):
        lo, hi = f.get("min"), f.get("max")
        if not isinstance(lo, int) or isinstance(lo, bool) or not isinstance(hi, int) or isinstance(hi, bool) \
                or lo < 0 or hi < -1 or (hi != -1 and hi < lo) or max(lo, hi) > 100_000:
            raise StructuralTagError("min and max must be integers with 0 <= min <= max <= 100000 (max -1: no limit)",
                                     path)
        return self._repeated(f, path, depth, lo, None if hi == -1 else hi)

    # ---- tags
    def _tag_parts(self, f, path, depth) -> tuple[bytes, Any]:
        """(begin, the automaton of the content and the end) of a ``tag`` format."""
        if not isinstance(f, dict) or f.get("type") != "tag":
            raise StructuralTagError("must be a format of type 'tag'", path)
        begin = _text(f.get("begin"), f"{path}.begin", empty_ok=True)
        end = f.get("end")
        ends = tuple(_texts(end, f"{path}.end") if isinstance(end, list) else [_text(end, f"{path}.end",
                                                                                       empty_ok=True)])
        body, took = self.compile(f.get("content"), f"{path}.content", ends if all(ends) else None, depth)
        return begin, body if took else Concat([body, _ends(ends)])

    def _tag(self, f, path, tail, depth):
        begin, body = self._tag_parts(f, path, depth)
        return Concat([Literal(begin), body]), False

    def _tag_list(self, f, path, depth) -> list[tuple[bytes, Any]]:
        tags = self._parts(f, path, "tags")
        return [self._tag_parts(t, f"{path}.tags[{i}]", depth) for i, t in enumerate(tags)]

    def _triggered_tags(self, f, path, tail, depth):
        triggers = _texts(f.get("triggers"), f"{path}.triggers")
        _check_triggers(triggers, f"{path}.triggers")
        tags = self._tag_list(f, path, depth)
        for i, (begin, _) in enumerate(tags):
            _trigger_of(begin, triggers, f"{path}.tags[{i}].begin")
        excludes = _texts(f.get("excludes"), f"{path}.excludes", required=False)
        first, only = _flag(f, "at_least_one", path), _flag(f, "stop_after_first", path)
        ends = () if first and only else self._free_ends(tail, path, "triggered_tags")  # one tag: no free text
        return _dispatch(path, triggers, tags, ends=ends, excludes=excludes, at_least_one=first,
                         stop_after_first=only), bool(ends)

    def _tags_with_separator(self, f, path, tail, depth):
        tags = [Concat([Literal(b), body]) for b, body in self._tag_list(f, path, depth)]
        sep = _text(f.get("separator"), f"{path}.separator", empty_ok=True)
        one = tags[0] if len(tags) == 1 else Alternatives(tags)
        seq = one if _flag(f, "stop_after_first", path) else Concat([one, Repeat(Concat([Literal(sep), one]), 0, None)])
        return (seq if _flag(f, "at_least_one", path) else Alternatives([seq, Literal(b"")])), False


def _from_source(f: dict, key: str, path: str, build):
    """The automaton ``build`` compiles from the string ``f[key]`` (a regex, a GBNF grammar); its errors name
    the field."""
    text = f.get(key)
    if not isinstance(text, str):
        raise StructuralTagError(f"{key} must be a string", path)
    try:
        return build(text)
    except ValueError as e:
        raise StructuralTagError(str(e), f"{path}.{key}") from None
