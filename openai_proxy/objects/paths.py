"""Which upstream calls name a stored object, which create one, and where an answer names it.

Both route families end in the same upstream paths (`/openai2/<id>` calls `/responses/<id>`), so one
reading of the upstream call serves both. Paths are read segment by segment, each percent-decoded,
since upstream decodes them too: `resp%5Fx` is `resp_x`.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from openai_proxy.objects import (
    BATCH,
    CHAT_COMPLETION,
    CONTAINER,
    CONVERSATION,
    FILE,
    RESPONSE,
    UPLOAD,
    VECTOR_STORE,
)

# The path (segments below the API's base) of each kind's collection: `/<collection>/<id>[/...]`
# is about object <id>, and a POST to `/<collection>` creates one.
COLLECTIONS: dict[tuple[str, ...], str] = {
    ("responses",): RESPONSE,
    ("files",): FILE,
    ("batches",): BATCH,
    ("vector_stores",): VECTOR_STORE,
    ("containers",): CONTAINER,
    ("uploads",): UPLOAD,
    ("conversations",): CONVERSATION,
    ("chat", "completions"): CHAT_COMPLETION,
}
# Operations that sit where an id would: `/responses/compact` is not the response "compact".
NOT_IDS = {RESPONSE: frozenset({"compact", "input_tokens"})}
# Create-style calls whose JSON body may continue another stored object.
CONTINUING = frozenset({"/responses", "/responses/compact", "/responses/input_tokens"})
MAX_ID = 256
LABELS = {
    RESPONSE: "Response",
    FILE: "File",
    BATCH: "Batch",
    VECTOR_STORE: "Vector store",
    CONTAINER: "Container",
    UPLOAD: "Upload",
    CONVERSATION: "Conversation",
    CHAT_COMPLETION: "Chat completion",
}


_BY_FIRST = {collection[0]: (collection, kind) for collection, kind in COLLECTIONS.items()}


def segments(path: str) -> list[str]:
    """The path's non-empty segments, percent-decoded."""
    if "%" not in path:  # every call comes here: the common case skips decoding
        return [part for part in path.split("/") if part]
    return [unquote(part) for part in path.split("/") if part]


def path_reference(parts: list[str]) -> tuple[str, str] | None:
    """(kind, id) of the stored object a call's upstream path (its `segments`) is about, if any."""
    found = _BY_FIRST.get(parts[0]) if parts else None
    if found is None:
        return None
    collection, kind = found
    n = len(collection)
    if len(parts) <= n or tuple(parts[:n]) != collection:
        return None
    object_id = parts[n]
    if object_id in NOT_IDS.get(kind, ()):
        return None
    return kind, object_id


def body_references(path: str, body: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, id, field) of each stored object a Responses create-style body continues:
    `previous_response_id`, and `conversation` (an id, or `{"id": ...}`)."""
    if path not in CONTINUING:
        return []
    found = []
    previous = body.get("previous_response_id")
    if isinstance(previous, str) and previous:
        found.append((RESPONSE, previous, "previous_response_id"))
    conversation = body.get("conversation")
    if isinstance(conversation, Mapping):
        conversation = conversation.get("id")
    if isinstance(conversation, str) and conversation:
        found.append((CONVERSATION, conversation, "conversation"))
    return found


def created_kind(method: str, parts: list[str], stores_chat: bool) -> str | None:
    """The kind of object a successful call (its path's `segments`) creates, if any. A chat completion
    is stored (and can be fetched again) only when its body says `"store": true` (`stores_chat`)."""
    if method != "POST":
        return None
    kind = COLLECTIONS.get(tuple(parts))
    if kind == CHAT_COMPLETION and not stores_chat:
        return None
    return kind


def ids_in_answer(kind: str, data: Any) -> list[tuple[str, str]]:
    """(kind, id) of the objects an answer (or stream event) about a `kind` object names, and that
    belong with it: its own id; a batch's output and error files; the file an upload completes into."""
    if not isinstance(data, Mapping):
        return []
    inner = data.get("response") if kind == RESPONSE else None
    obj = inner if isinstance(inner, Mapping) else data  # a Responses stream event carries the response
    found: list[tuple[str, str]] = []
    _add(found, kind, obj.get("id"))
    if kind == BATCH:
        _add(found, FILE, obj.get("output_file_id"))
        _add(found, FILE, obj.get("error_file_id"))
    elif kind == UPLOAD:
        file = obj.get("file")
        if isinstance(file, Mapping):
            _add(found, FILE, file.get("id"))
    return found


def _add(found: list[tuple[str, str]], kind: str, object_id: Any) -> None:
    if isinstance(object_id, str) and 0 < len(object_id) <= MAX_ID:
        found.append((kind, object_id))


def watches_answers(kind: str, method: str, path: str) -> bool:
    """Whether a follow-up's answer may name objects that belong with `kind`'s object (a batch's
    result files appear when it has run; an upload becomes a file when it is completed)."""
    if kind == BATCH:
        return True
    return kind == UPLOAD and method == "POST" and path.rstrip("/").endswith("/complete")
