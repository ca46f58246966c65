"""The stack alone, for `bench/floor.py`: what gunicorn's gevent worker, Flask and one upstream call
cost before the proxy does anything of its own. Served by `gunicorn -k gevent floor_apps:<name>`.

- `wsgi`: a bare WSGI app that parses the JSON POST and answers a small JSON body.
- `flask`: the same as a Flask view.
- `relay`: the bare WSGI app, plus one call to the fake upstream (`FLOOR_UPSTREAM`, its `/v1` URL)
  through the proxy's own pooled upstream client, whose JSON answer it returns.
- `flask_relay`: the same call from a Flask view: the stack and one upstream call, nothing else.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, request

ANSWER = json.dumps({"id": "x", "choices": [{"message": {"role": "assistant", "content": "Hello"}}]}).encode()
HEADERS = [
    ("Content-Type", "application/json"),
    ("Authorization", "Bearer sk-floor"),
    ("User-Agent", "floor"),
]


def _body(environ: dict[str, Any]) -> dict[str, Any]:
    return json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))


def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    _body(environ)
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))])
    return [ANSWER]


flask = Flask(__name__)


@flask.post("/openai")
def _openai() -> Response:
    json.loads(request.get_data())
    return Response(ANSWER, mimetype="application/json")


_client: Any = None


def relay(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    answer = _call_upstream(_body(environ))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]


flask_relay = Flask(__name__ + ".relay")


@flask_relay.post("/openai")
def _openai_relay() -> Response:
    return Response(_call_upstream(json.loads(request.get_data())), mimetype="application/json")


def _call_upstream(body: dict[str, Any]) -> bytes:
    global _client
    if _client is None:  # made in the worker, after the fork
        from openai_proxy.upstream.client import UpstreamClient
        from openai_proxy.upstream.settings import ClientSettings

        url = urlsplit(os.environ["FLOOR_UPSTREAM"])
        host, port = url.hostname or "127.0.0.1", url.port or 80
        settings = ClientSettings(
            origin=f"http://{host}:{port}", tls=False, host=host, port=port, base_path="/v1",
            ssl_context=None, proxy=None, connect_timeout=5.0, read_timeout=600.0,
            max_connections=1000, user_agent="floor",
        )  # fmt: skip
        _client = UpstreamClient(settings)
    body.pop("security_key", None)
    response = _client.send(
        "POST", "/v1/chat/completions", HEADERS, json.dumps(body).encode(), header_timeout=600.0
    )
    try:
        return response.read_body(10 * 1024 * 1024)
    finally:
        response.close()
