"""What a request may do with stored objects, judged on its upstream call before a gate slot is taken.

`claim(call)` (from `openai_proxy.pipeline`, for every upstream call of a client):
- an object the call is about (its path: `/responses/<id>`, `/files/<id>/content`, ...) or continues
  (a Responses body's `previous_response_id`, `conversation`) must be the client's: another client's
  object is 404 in the route family's shape and upstream is not called. One the proxy has no record
  of is the client's choice (`Client.unknown_objects`: open for `default`, closed for named clients
  unless the clients file says `unknown_objects = "allow"`);
- a call about the client's own object goes to the pool key that created it (`Credentials.object_key`);
- a call that creates an object, or whose answer names objects that belong with one (a batch's
  result files, the file an upload becomes), gets an `ObjectWatch` on its record: the relays show it
  the answer, or the stream's events until it has the id, before the client sees them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from flask import g

from openai_proxy import jsonio
from openai_proxy.clients import Client
from openai_proxy.errors import BadRequest, ObjectNotFound, ObjectsUnavailable
from openai_proxy.objects import BookUnavailable, ObjectBook, Owner
from openai_proxy.objects import paths as op
from openai_proxy.record import RequestRecord
from openai_proxy.state import state
from openai_proxy.upstream import UpstreamCall

MAX_SHOWN_ID = 100
# What OpenAI's object ids are made of. Where clients share the proxy, another id is refused, never
# forwarded: an upstream that normalised it (case, a stray character) could reach an object recorded
# under its plain spelling.
OBJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")


def claim(call: UpstreamCall) -> None:
    """Refuse (404) a call about another client's object, pin a call about the client's own object to
    its key, and watch the answer of a call that creates one. Outside API requests (the deep health
    check) there is no client and nothing to judge."""
    client: Client | None = g.get("client")
    if client is None:
        return
    st = state()
    shared = len(st.clients) > 1  # whether another client could own an object
    parts = op.segments(call.path)
    path = "/" + "/".join(parts)
    about = op.path_reference(parts)
    references = [(about[0], about[1], None)] if about else []
    # The only client, free to use any object, on one upstream key: nothing to look up.
    judged = shared or not client.unknown_objects or call.credentials.pooled
    if judged and call.method == "POST" and path in op.CONTINUING:
        body = _json_body(call, shared)
        if body is not None:
            continued = op.body_references(path, body)
            if continued and isinstance(call.body, bytes | bytearray):
                # Upstream reads exactly what was judged here: no second `previous_response_id` or
                # escaped key spelling that another JSON parser would read differently.
                call.body = jsonio.dumps(body)
                if call.content_length is not None:
                    call.content_length = len(call.body)
            references += continued
    pinned: Owner | None = None
    for kind, object_id, field in references if judged else ():
        owner = _owner(st.objects, client, kind, object_id, field, shared)
        if owner is not None and pinned is None:
            pinned = owner
    if pinned is not None and pinned.key_name and call.credentials.pooled:
        call.credentials = replace(call.credentials, object_key=pinned.key_name)
    created = op.created_kind(call.method, parts, path == "/chat/completions" and _stores(call))
    if created is not None:
        call.record.object_watch = ObjectWatch(st.objects, client.name, created, call.record)
    elif about is not None and pinned is not None and op.watches_answers(about[0], call.method, path):
        call.record.object_watch = ObjectWatch(st.objects, client.name, about[0], call.record)


def _owner(
    book: ObjectBook, client: Client, kind: str, object_id: str, field: str | None, shared: bool
) -> Owner | None:
    """The owner of an object the call uses, if it is this client; None for an object the proxy has
    no record of that the client may use; ObjectNotFound otherwise."""
    if shared and not OBJECT_ID.fullmatch(object_id):
        raise _not_found(kind, object_id, field)
    try:
        owner = book.owner(object_id)
    except BookUnavailable as exc:
        if client.unknown_objects and not shared:
            return None  # the only client there is: nobody else's object can be reached
        raise ObjectsUnavailable(
            f"The proxy cannot tell who owns '{object_id[:MAX_SHOWN_ID]}' right now (its database does not"
            " answer); retry shortly"
        ) from exc
    if owner is None and client.unknown_objects:
        return None
    if owner is None or owner.client != client.name:
        raise _not_found(kind, object_id, field)
    return owner


def _not_found(kind: str, object_id: str, field: str | None) -> ObjectNotFound:
    """The same answer whether the object is another client's or unknown: existence is not revealed."""
    label = "Previous response" if field == "previous_response_id" else op.LABELS[kind]
    return ObjectNotFound(f"{label} with id '{object_id[:MAX_SHOWN_ID]}' not found.")


def _json_body(call: UpstreamCall, shared: bool) -> dict[str, Any] | None:
    """The JSON object a Responses create-style call sends. One the proxy cannot read could continue
    another client's conversation unseen: refused when there are other clients."""
    body = call.body
    if isinstance(body, bytes | bytearray):
        if not body.strip():
            return None
        try:
            parsed = jsonio.loads(body)
        except jsonio.JSONDecodeError:
            parsed = None
        else:
            return parsed if isinstance(parsed, dict) else None
    if shared:
        raise BadRequest(
            "The request body must be a JSON object the proxy can read (UTF-8, no BOM, standard JSON):"
            " it checks previous_response_id and conversation"
        )
    return None


def _stores(call: UpstreamCall) -> bool:
    """Whether a chat completion call asks OpenAI to store the completion (`"store": true`)."""
    body = call.body
    if not isinstance(body, bytes | bytearray) or b"store" not in body:
        return False  # an escaped spelling is not recorded, and then closed to named clients
    try:
        parsed = jsonio.loads(body)
    except jsonio.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and parsed.get("store") is True


def _key_name(record: RequestRecord) -> str | None:
    """The pool key that answered: the last attempt's (None when the call did not use the pool)."""
    return record.attempts[-1].get("key") if record.attempts else None


class ObjectWatch:
    """Records the objects an answer names for the client (`RequestRecord.object_watch`): called with
    the answer, or with each stream event while `waiting`, before the client gets it."""

    __slots__ = ("_book", "_client", "_kind", "_record", "waiting")

    def __init__(self, book: ObjectBook, client: str, kind: str, record: RequestRecord) -> None:
        self._book, self._client, self._kind, self._record = book, client, kind, record
        self.waiting = True

    def __call__(self, data: Any) -> None:
        if not self.waiting:
            return
        found = op.ids_in_answer(self._kind, data)
        if not found:
            return
        self.waiting = False
        key_name = _key_name(self._record)
        for kind, object_id in found:
            self._book.record(kind, object_id, self._client, key_name)
