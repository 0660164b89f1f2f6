"""GLM-5's added (special) tokens, in official id order.

The official GLM-5 tokenizer has 154,820 byte-level BPE tokens followed by 36
added tokens with the contiguous ids 154820..154855 (reference:
``chat-format-and-serving.md`` §1.1). Every one of them is matched literally
before BPE runs, so none is ever split.

Only the first 18 (``<|endoftext|>`` .. ``<|end_of_transcription|>``) are
*special* in the Hugging Face sense (``special: true``; they are the
``extra_special_tokens`` of the published ``tokenizer_config.json``). The rest
(FIM markers, ``<think>``, ``<tool_call>``, ``<arg_key>``, ...) are ordinary
added tokens, so ``decode(..., skip_special_tokens=True)`` keeps the reasoning
and tool-call tags that the output parser needs.

Our own trained tokenizers append the same 36 strings, in the same order,
right after their learned vocabulary, so ``id = first_special_id + index``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialToken:
    """One added token: its text, HF ``special`` flag and what it is for."""

    content: str
    special: bool
    role: str


#: Id of ``<|endoftext|>`` in the official GLM-5 tokenizer.
GLM5_FIRST_SPECIAL_ID = 154820
#: Number of learned BPE tokens in the official GLM-5 tokenizer.
GLM5_BPE_VOCAB_SIZE = 154820

# Tag strings used by the chat template and the output parser.
ENDOFTEXT = "<|endoftext|>"
GMASK = "[gMASK]"
SOP = "<sop>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
OBSERVATION = "<|observation|>"
THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
ARG_KEY_START = "<arg_key>"
ARG_KEY_END = "</arg_key>"
ARG_VALUE_START = "<arg_value>"
ARG_VALUE_END = "</arg_value>"
NOTHINK = "/nothink"

#: The 36 added tokens in id order (index i has id ``first_special_id + i``).
SPECIAL_TOKENS: tuple[SpecialToken, ...] = (
    SpecialToken(ENDOFTEXT, True, "end of text; EOS and pad"),
    SpecialToken("[MASK]", True, "legacy"),
    SpecialToken(GMASK, True, "prompt prefix (BOS in GGUF metadata)"),
    SpecialToken("[sMASK]", True, "legacy"),
    SpecialToken(SOP, True, "prompt prefix"),
    SpecialToken("<eop>", True, "legacy"),
    SpecialToken(SYSTEM, True, "system role"),
    SpecialToken(USER, True, "user role; also an EOS"),
    SpecialToken(ASSISTANT, True, "assistant role"),
    SpecialToken(OBSERVATION, True, "tool-result role; also an EOS"),
    SpecialToken("<|begin_of_image|>", True, "multimodal"),
    SpecialToken("<|end_of_image|>", True, "multimodal"),
    SpecialToken("<|begin_of_video|>", True, "multimodal"),
    SpecialToken("<|end_of_video|>", True, "multimodal"),
    SpecialToken("<|begin_of_audio|>", True, "multimodal"),
    SpecialToken("<|end_of_audio|>", True, "multimodal"),
    SpecialToken("<|begin_of_transcription|>", True, "multimodal"),
    SpecialToken("<|end_of_transcription|>", True, "multimodal"),
    SpecialToken("<|code_prefix|>", False, "fill-in-the-middle"),
    SpecialToken("<|code_middle|>", False, "fill-in-the-middle"),
    SpecialToken("<|code_suffix|>", False, "fill-in-the-middle"),
    SpecialToken(THINK_START, False, "reasoning start"),
    SpecialToken(THINK_END, False, "reasoning end"),
    SpecialToken(TOOL_CALL_START, False, "tool call start"),
    SpecialToken(TOOL_CALL_END, False, "tool call end"),
    SpecialToken(TOOL_RESPONSE_START, False, "tool result start"),
    SpecialToken(TOOL_RESPONSE_END, False, "tool result end"),
    SpecialToken(ARG_KEY_START, False, "tool argument key start"),
    SpecialToken(ARG_KEY_END, False, "tool argument key end"),
    SpecialToken(ARG_VALUE_START, False, "tool argument value start"),
    SpecialToken(ARG_VALUE_END, False, "tool argument value end"),
    SpecialToken(NOTHINK, False, "legacy no-think switch"),
    SpecialToken("<|begin_of_box|>", False, "misc"),
    SpecialToken("<|end_of_box|>", False, "misc"),
    SpecialToken("<|image|>", False, "misc"),
    SpecialToken("<|video|>", False, "misc"),
)

#: Just the strings, in id order.
SPECIAL_TOKEN_STRINGS: tuple[str, ...] = tuple(t.content for t in SPECIAL_TOKENS)

#: GLM-5's EOS set (``generation_config.eos_token_id`` = [154820, 154827, 154829]).
EOS_TOKENS: tuple[str, ...] = (ENDOFTEXT, USER, OBSERVATION)
#: The pad token (same id as the first EOS).
PAD_TOKEN = ENDOFTEXT
#: Extra stop tokens a conservative server adds on top of the EOS set: a turn
#: that starts another role has certainly left the assistant's turn.
EXTRA_STOP_TOKENS: tuple[str, ...] = (ASSISTANT, SYSTEM)

assert len(SPECIAL_TOKENS) == 36
assert len(set(SPECIAL_TOKEN_STRINGS)) == 36


def official_id(token: str) -> int:
    """The id ``token`` has in the official GLM-5 tokenizer."""
    return GLM5_FIRST_SPECIAL_ID + SPECIAL_TOKEN_STRINGS.index(token)
