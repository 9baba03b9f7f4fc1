"""GET /v1/responses/{id}/input_items: the stored conversation a response was generated from,
paged as OpenAI pages it (`limit`, `order`, `after`; newest first by default).

Items are listed as OpenAI lists them: every item has an id and a status, and a message's
string content is a list of `input_text` parts. Ids are given when the response is stored
(`with_ids`), so paging by `after` is stable across calls and replicas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec
from msgspec import Struct

from dynamo import errors
from frontend.responses.encode import new_id
from frontend.responses.schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputText,
    Item,
    MessageItem,
    ReasoningItem,
    StoredResponse,
)

_ID_PREFIX: dict[type, str] = {
    MessageItem: "msg",
    FunctionCallItem: "fc",
    FunctionCallOutputItem: "fco",
    ReasoningItem: "rs",
}
_PARAMS = frozenset({"limit", "order", "after", "include"})  # OpenAI's, as its client sends them
MAX_LIMIT = 100


class InputItemList(Struct, kw_only=True):
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


def with_ids(items: list[Item]) -> list[Item]:
    """The items, each with an id (new ones for those the client sent without)."""
    return [item if item.id else msgspec.structs.replace(item, id=new_id(_ID_PREFIX[type(item)])) for item in items]


def _listed(item: Item) -> Item:
    if isinstance(item, MessageItem) and isinstance(item.content, str):
        item = msgspec.structs.replace(item, content=[InputText(item.content)])
    if item.status is None:
        item = msgspec.structs.replace(item, status="completed")
    return item


def list_input_items(record: StoredResponse, query: Mapping[str, str]) -> InputItemList:
    """One page of the record's input items; errors name the query parameter at fault."""
    unknown = sorted(set(query) - _PARAMS)
    if unknown:
        raise errors.InvalidRequest(f"Unrecognized query parameter: {unknown[0]}", param=unknown[0])
    if query.get("include"):
        # OpenAI's include values add image URLs, file results and logprobs: none apply here.
        raise errors.InvalidRequest(f"include={query['include']!r} is not supported by this server", param="include")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise errors.InvalidRequest(f"limit must be an integer, got {query['limit']!r}", param="limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise errors.InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise errors.InvalidRequest(f"order must be 'asc' or 'desc', got {order!r}", param="order")
    items = list(record.input) if order == "asc" else list(reversed(record.input))
    after = query.get("after")
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise errors.InvalidRequest(f"No input item with id {after!r} in response {record.response.id!r}", param="after")
        items = items[ids.index(after) + 1 :]
    window = items
    page = [_listed(item) for item in window[:limit]]
    return InputItemList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(window) > limit,
    )
