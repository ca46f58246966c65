"""Stored objects and who owns them (contract §14): a response, file, batch, vector store, container,
upload, conversation or stored chat completion created through the proxy belongs to the client that
created it, and lives on the upstream key that created it.

The book (`ObjectBook`) records, when a create call succeeds, the new object's id with its client and
key name, and answers who owns an id. The one backend (`openai_proxy.objects.book`) keeps the book in
the request log's database (`OPENAI_PROXY_LOG_DB`), so hosts sharing a PostgreSQL log share it.
Which paths, bodies and answers name which objects is `openai_proxy.objects.paths`; what a request
may do with them (404, the key a follow-up goes to) is `openai_proxy.objects.guard`.

This face imports only the standard library (like every package face; DESIGN "Layout").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from openai_proxy.log import RequestLog

RESPONSE = "response"
FILE = "file"
BATCH = "batch"
VECTOR_STORE = "vector_store"
CONTAINER = "container"
UPLOAD = "upload"
CONVERSATION = "conversation"
CHAT_COMPLETION = "chat_completion"


@dataclass(frozen=True)
class Owner:
    """Who created a stored object, and with which upstream key of the pool (None: not a pool key,
    e.g. the request's own `openai_api_key`, or a proxy without a pool)."""

    kind: str
    client: str
    key_name: str | None


class BookUnavailable(Exception):
    """The book cannot say who owns an object right now (its database is unreachable or too slow)."""


class AnswerWatch(Protocol):
    """What the relays call with a create call's answer, or its stream events while `waiting`, before
    the client gets them (`guard.ObjectWatch` records the objects they name)."""

    waiting: bool

    def __call__(self, data: Any) -> None: ...


class ObjectBook(Protocol):
    def record(self, kind: str, object_id: str, client: str, key_name: str | None) -> None:
        """Note that `client` created `object_id` with the pool key `key_name`: durable (shared by
        every worker and host) when this returns, unless the database is failing; then it is kept in
        this worker and written as soon as the database is back. Never raises."""
        ...

    def owner(self, object_id: str) -> Owner | None:
        """Who owns `object_id`; None when the proxy has no record of it. Raises BookUnavailable."""
        ...

    def stats(self) -> dict[str, Any]:
        """For `/health`: `pending` (owners this worker has not written yet), `cached`, and `failing`
        (the last write did not go through)."""
        ...

    def close(self) -> None: ...


def open_object_book(log_store: RequestLog) -> ObjectBook:
    """The book, kept in the request log's database."""
    from openai_proxy.objects.book import LogObjectBook

    return LogObjectBook(log_store)
