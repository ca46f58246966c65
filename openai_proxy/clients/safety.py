"""`safety_identifier`: which client sent a chat or Responses create call, as OpenAI's abuse controls
see it.

All clients share the proxy's upstream keys, so without it OpenAI could only act against the whole
organisation's key. Each client gets a stable value of its own: the hex HMAC-SHA256 of its name
(64 characters, OpenAI's limit), keyed with `OPENAI_PROXY_SAFETY_SECRET` when set, else with the
SHA-256 of the client's own key, which every host of a deployment has and OpenAI never sees. So it
says nothing of the name or the key, needs no setup, and is the same on every host and after
restarts; without the secret it changes when the client's key does.

A caller's own `safety_identifier`, or its `user` (the older field it replaces), is kept as sent.
`OPENAI_PROXY_SAFETY_IDENTIFIER=off` turns the whole thing off.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from flask import g

from openai_proxy.clients import Client
from openai_proxy.state import state

FIELD = "safety_identifier"
# Fields by which a caller already says who the end user is.
CALLER_FIELDS = (FIELD, "user")


def safety_identifier(client: Client, secret: str | None) -> str:
    """The client's value: hex HMAC-SHA256 of its name, keyed by `secret` or its key's digest."""
    key = secret.encode("utf-8", "surrogatepass") if secret else client.digest
    return hmac.new(key, client.name.encode(), hashlib.sha256).hexdigest()


def add_safety_identifier(body: dict[str, Any]) -> bool:
    """Add the current client's value to a create call's body unless the caller named its user or it
    is turned off; whether the body changed."""
    client: Client | None = g.get("client")
    config = state().config
    sent = any(body.get(name) not in (None, "") for name in CALLER_FIELDS)
    if client is None or not config.safety_identifier or sent:
        return False
    body[FIELD] = safety_identifier(client, config.safety_secret)
    return True
