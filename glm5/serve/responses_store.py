"""Stored responses (``store: true``) and their input items (``GET /v1/responses/{id}/input_items``).

A stored record keeps three things: the response object as ``GET /v1/responses/{id}`` returns it, the
conversation as chat messages (what ``previous_response_id`` renders), and the conversation as Responses items,
each with an id (what the input-items listing pages through). The items of a response are everything that was
its input apart from ``instructions``: with ``previous_response_id``, the earlier turns' input and output items
come first, then this request's own input, so the listing of the last response of a chain shows the whole
conversation the model saw.

Why the whole chain and not only the request's own ``input``: OpenAI's reference describes the listing's ``data``
as "a list of items used to generate this response" (the SDK's ``ResponseItemList``), and its ``conversation``
parameter as items that "are prepended to ``input_items`` for this response request"; ``previous_response_id``
is the same mechanism for a chain of responses, so the earlier turns are part of what generated the response.
The page names no filter for "this request only", and OpenAI-compatible servers that document the point (Alibaba
Model Studio's list-input-items page) list the earlier turns too. A client after only its own last input takes
the newest items (``order="desc"``, the default).

Reads show ``output_text`` logprobs only when their ``include`` asks for them (:func:`shown`), as a create does.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request

log = logging.getLogger("glm5.serve")

#: Characters (JSON) the store may hold in all; the oldest responses go first past this or the item limit. Each
#: record holds its whole conversation, so a long chain costs O(turns^2): the bound is what keeps that finite.
MAX_STORE_CHARS = 256 << 20

#: id prefixes of the items this server writes (and of the input items it names when the client gave no id)
_ID_PREFIX = {"message": "msg", "reasoning": "rs", "function_call": "fc", "function_call_output": "fco"}


@dataclass
class StoredResponse:
    response: dict  # the response object, as GET returns it
    history: list[dict]  # chat messages of the conversation, output included, without instructions
    size: int
    input_items: list[dict] = field(default_factory=list)  # the response's input as items, each with an id


class ResponseStore:
    """Finished responses by id, least recently used evicted first (by count and by total JSON size). Touched
    only from the event loop, so it needs no lock."""

    def __init__(self, max_items: int, max_chars: int = MAX_STORE_CHARS):
        self.max_items = max(0, max_items)
        self.max_chars = max_chars
        self.chars = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, response: dict, history: list[dict],
            input_items: list[dict] | None = None) -> None:
        input_items = input_items or []
        size = sum(len(json.dumps(x, ensure_ascii=False)) for x in (response, history, input_items))
        if self.max_items == 0 or size > self.max_chars:
            log.warning("response %s not stored (%d characters; store limit %d)", response_id, size, self.max_chars)
            return
        self.delete(response_id)
        self._items[response_id] = StoredResponse(response, history, size, input_items)
        self.chars += size
        while len(self._items) > self.max_items or self.chars > self.max_chars:
            _, old = self._items.popitem(last=False)
            self.chars -= old.size

    def get(self, response_id: str) -> StoredResponse | None:
        rec = self._items.get(response_id)
        if rec is not None:
            self._items.move_to_end(response_id)
        return rec

    def delete(self, response_id: str) -> bool:
        rec = self._items.pop(response_id, None)
        if rec is not None:
            self.chars -= rec.size
        return rec is not None


# ------------------------------------------------------------------------------------------ input items
def as_items(request_input: str | list[Any] | None, taken: set[str]) -> list[dict]:
    """A request's ``input`` as stored items, each with an id unique within the conversation (``taken``, updated
    here). The input was already checked by :func:`~glm5.serve.responses_protocol.items_to_messages`, so shapes
    are known. A client's own id is kept unless the conversation already has it (a client that sends back output
    items with ``previous_response_id`` repeats their ids): the listing's ``after`` cursor needs unique ids."""
    if request_input is None:
        return []
    if isinstance(request_input, str):
        request_input = [{"type": "message", "role": "user", "content": request_input}]
    out = []
    for raw in request_input:
        item = dict(raw)
        kind = item.setdefault("type", "message")
        if kind == "message" and isinstance(item.get("content"), str):  # the listing shows content as parts
            text = item["content"]
            item["content"] = ([{"type": "output_text", "text": text, "annotations": []}]
                               if item.get("role") == "assistant" else [{"type": "input_text", "text": text}])
        if kind != "reasoning":  # reasoning items have no status of their own
            item.setdefault("status", "completed")
        rid = item.get("id")
        if not isinstance(rid, str) or not rid or rid in taken:
            rid = item["id"] = f"{_ID_PREFIX.get(kind, 'item')}_{uuid.uuid4().hex}"
        taken.add(rid)
        out.append(item)
    return out


def conversation_items(previous: StoredResponse | None, request_input: str | list[Any] | None) -> list[dict]:
    """All input items of a new response: the previous response's input and output items, then this input."""
    items = list(previous.input_items) + list(previous.response.get("output", [])) if previous is not None else []
    return items + as_items(request_input, {i["id"] for i in items})


def shown(items: list[dict], logprobs: bool) -> list[dict]:
    """Stored items as a read returns them. ``include`` is opt-in per request ("additional fields to include in
    the response"), on a read as on a create, so a read that does not ask for ``message.output_text.logprobs``
    gets the empty list a create without it gets, even when the create asked for them and they were stored. The
    stored items are never changed: only the parts that lose their logprobs are copied."""
    return items if logprobs else [_without_logprobs(i) for i in items]


def _without_logprobs(item: dict) -> dict:
    parts = item.get("content")
    if not isinstance(parts, list) or not any(isinstance(p, dict) and p.get("logprobs") for p in parts):
        return item
    return {**item, "content": [{**p, "logprobs": []} if isinstance(p, dict) and p.get("logprobs") else p
                                for p in parts]}


def list_page(rec: StoredResponse, *, limit: int, order: str, after: str | None, logprobs: bool = True) -> dict:
    """One page of the input-items listing: OpenAI's cursor list, newest first with ``order="desc"``. The items of
    earlier turns' outputs keep their logprobs only with ``logprobs`` (the read's ``include``, :func:`shown`)."""
    items = rec.input_items if order == "asc" else rec.input_items[::-1]
    start = 0
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise bad_request(f"No input item with id '{after}' in this response.", param="after")
        start = ids.index(after) + 1
    page = shown(items[start:start + limit], logprobs)
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}
