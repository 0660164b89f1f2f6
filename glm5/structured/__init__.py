"""Structured outputs: grammars that make generated text valid by construction.

A grammar walks the tokenizer's byte-level vocabulary with a byte automaton and masks, at each step, the tokens
that could not lead to a valid output within the remaining token budget. The engine applies one per sequence
through :class:`ConstrainedLogitsProcessor`:

* one JSON object, or a document a JSON Schema accepts (:class:`JsonGrammar`, schemas compiled by
  :func:`compile_schema`): ``SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))`` offline,
  ``response_format`` on the server;
* exactly one of a few strings (:mod:`glm5.structured.choice`), a full match of a regular expression
  (:mod:`glm5.structured.regex`) or a sentence of a GBNF grammar (:mod:`glm5.structured.gbnf`):
  ``StructuredOutputsParams(choice=...)`` / ``(regex=...)`` / ``(grammar=...)``;
* free text whose triggered parts follow tags and schemas (:mod:`glm5.structured.structural_tag`, vLLM's
  ``structural_tag``): ``StructuredOutputsParams(structural_tag=...)``;
* GLM-5 tool calls of given tools with schema-checked arguments (:class:`ToolCallGrammar`): the server's
  ``tool_choice: "required"`` / a named tool.

It depends on the tokenizer only; the engine and the server build on it.
"""

from .constrained import ConstrainedLogitsProcessor, GrammarCache, JsonGrammar, TokenVocab, json_logits_processor
from .json_schema import SchemaError, compile_schema
from .structural_tag import StructuralTagError, compile_structural_tag
from .tool_grammar import ToolCallGrammar

__all__ = [
    "ConstrainedLogitsProcessor",
    "GrammarCache",
    "JsonGrammar",
    "SchemaError",
    "StructuralTagError",
    "TokenVocab",
    "ToolCallGrammar",
    "compile_schema",
    "compile_structural_tag",
    "json_logits_processor",
]
