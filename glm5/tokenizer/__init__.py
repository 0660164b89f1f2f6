"""GLM-5 tokenizer, chat format and output parsing.

* :class:`GLM5Tokenizer` (``tokenizer.py``): load/save HF tokenizer dirs,
  encode/decode, EOS/stop ids, ``apply_chat_template``, ``fingerprint``.
* :func:`train_bpe` (``bpe.py``): byte-level BPE with GLM-5's 36 added tokens
  appended after the learned vocabulary.
* :func:`render_chat`, :data:`GLM5_CHAT_TEMPLATE` (``chat_template.py``): the
  GLM-5 prompt format in Python and Jinja (byte-identical).
* :func:`parse_output`, :class:`StreamingParser` (``parser.py``): model output
  -> reasoning / content / OpenAI tool calls, one-shot or as streaming deltas.
* :class:`IncrementalDetokenizer` (``detokenize.py``): token ids -> text deltas
  that never split a UTF-8 character.
* ``special_tokens.py``: the official added-token list and EOS set.

Typical serving loop::

    tok = GLM5Tokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template(messages, tools=tools, enable_thinking=True)
    prompt_ids = tok.encode(prompt)              # already starts with [gMASK]<sop>
    detok = tok.incremental_detokenizer()        # keep special tokens: tags matter
    parser = StreamingParser(tools, thinking=prompt_opens_reasoning(prompt))
    for new_ids in engine.generate(prompt_ids, stop_token_ids=tok.stop_token_ids):
        for delta in parser.feed(detok.add(new_ids)):
            send_chunk(delta.to_openai())        # choices[0].delta
    for delta in parser.feed(detok.finish()) + parser.finish():
        send_chunk(delta.to_openai())
    message = parser.result().to_message()
"""

from .bpe import train_bpe
from .chat_template import GLM5_CHAT_TEMPLATE, normalize_messages, render_chat
from .deltas import Delta, ParsedOutput, ToolCall, ToolCallDelta, merge_deltas
from .detokenize import IncrementalDetokenizer
from .jinja_render import render_template
from .parser import StreamingParser, parse_output, prompt_opens_reasoning
from .special_tokens import EOS_TOKENS, EXTRA_STOP_TOKENS, PAD_TOKEN, SPECIAL_TOKEN_STRINGS, SPECIAL_TOKENS
from .tokenizer import GLM5Tokenizer

__all__ = [
    "Delta",
    "EOS_TOKENS",
    "EXTRA_STOP_TOKENS",
    "GLM5Tokenizer",
    "GLM5_CHAT_TEMPLATE",
    "IncrementalDetokenizer",
    "PAD_TOKEN",
    "ParsedOutput",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKEN_STRINGS",
    "StreamingParser",
    "ToolCall",
    "ToolCallDelta",
    "merge_deltas",
    "normalize_messages",
    "parse_output",
    "prompt_opens_reasoning",
    "render_chat",
    "render_template",
    "train_bpe",
]
